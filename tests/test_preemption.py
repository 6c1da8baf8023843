"""Stop signals in the training process: the first sets the flag, a second Ctrl-C raises."""

from __future__ import annotations

import os
import signal

import pytest

from dist_train.runtime.preemption import EXIT_INTERRUPTED, InterruptedTwice, catch_stop_signals, release_stop_signals


@pytest.fixture
def caught():
    catch_stop_signals()
    yield
    release_stop_signals()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_the_first_stop_signal_is_only_remembered(caught, sig):
    from dist_train.runtime.preemption import _received

    os.kill(os.getpid(), sig)
    assert _received == [sig]


def test_a_second_ctrl_c_unwinds_at_once_with_its_own_exit_code(caught):
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(InterruptedTwice, match="interrupted twice: stopped at once, without a new checkpoint"):
        os.kill(os.getpid(), signal.SIGINT)
    assert EXIT_INTERRUPTED == 128 + signal.SIGINT


def test_sigterm_after_ctrl_c_is_no_second_ctrl_c(caught):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. torchrun forwarding a stop: still a graceful one
    from dist_train.runtime.preemption import _received

    assert _received == [signal.SIGINT, signal.SIGTERM]
