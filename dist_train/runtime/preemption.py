"""Graceful stop on SIGTERM and SIGUSR1 (preemption, time limits, `scancel --signal`) and on
Ctrl-C (SIGINT).

The handler only sets a flag: saving inside a signal handler can deadlock or corrupt a
checkpoint. The loop asks `requested()` after every optimizer step; the answer is agreed by
all ranks (a sum over a one-element all-reduce), so every rank stops after the same step,
saves a resumable checkpoint and exits with EXIT_PREEMPTED (EXIT_INTERRUPTED for Ctrl-C).
Resume with `train.resume=auto`. A second Ctrl-C does not wait for the step: the process says
so in one line and exits at once with EXIT_INTERRUPTED (the checkpoints already written are
complete: they are written to a temporary name and renamed); a third, should the process be
stuck in a C call, ends it without unwinding. Its helper processes (fork server,
resource tracker, DataLoader workers) ignore SIGINT, which a terminal sends to the whole
process group, and end with the training process.

`catch_stop_signals()` runs first thing in `dist-train train`: a signal that arrives while the
process still imports or indexes shards is remembered, not fatal (SIGUSR1's default action
kills), and honoured after the first step, or sooner where start-up waits on a server that
fails (`stop_if_requested_in_startup`: between retries, with nothing to save yet). Under
Slurm every process of a job step receives
the signal, DataLoader workers included: they ignore it (`stop_signals_in_workers`) and leave
the decision to the training process, which shuts them down.

SIGUSR2 prints every thread's stack to stderr (`dump_stacks_on_request`), in the training
process and in its DataLoader workers: for a job that seems hung, `kill -USR2 PID` shows where.
"""

from __future__ import annotations

import atexit
import faulthandler
import functools
import multiprocessing.util  # noqa: F401 - its exit hook must be registered before ours
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kept light: `catch_stop_signals` runs before torch is imported
    from collections.abc import Callable
    from multiprocessing.context import BaseContext
    from multiprocessing.synchronize import Event

    from accelerate import Accelerator

# EX_TEMPFAIL from sysexits.h: "try again later". Job schedulers requeue on it.
EXIT_PREEMPTED = 75
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C: a user's stop, not a
# preemption to requeue.
EXIT_INTERRUPTED = 128 + signal.SIGINT
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class TrainingStopped(Exception):
    """Raised by `fit` after the checkpoint that a stop signal asked for has been saved."""

    def __init__(self, message: str, exit_code: int = EXIT_PREEMPTED):
        super().__init__(message)
        self.exit_code = exit_code


_received: list[int] = []  # the stop signals this process has received, in order
_previous: dict[int, object] = {}
_training = False  # a StopRequest exists: the loop honours a stop at its next step boundary
_catching_pid = 0  # the training process (catch_stop_signals), not a worker forked from it
# Set once the training process stops caring about signals (at exit, or when `fit` ends).
# Its DataLoader workers read it: until then a SIGTERM is not theirs to act on. Made with
# the first workers, in their multiprocessing context (`stop_signals_in_workers`).
_releasing: Event | None = None


def _release_workers() -> None:
    if _releasing is not None:
        _releasing.set()


# Registered after multiprocessing's own exit hook (imported above), so it runs before it:
# that hook SIGTERMs the workers and joins them.
atexit.register(_release_workers)


class InterruptedTwice(KeyboardInterrupt):
    """A second Ctrl-C: the user does not want to wait for the step to end."""

    def __str__(self) -> str:
        return "interrupted twice: stopped at once, without a new checkpoint"


def _exit_at_once(signum=None, frame=None) -> None:
    os.write(2, f"\ndist-train: {InterruptedTwice()}\n".encode())
    os._exit(EXIT_INTERRUPTED)


def _remember(signum, frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        if _received.count(signal.SIGINT) >= 2:  # the interpreter is stuck in C: leave without unwinding
            _exit_at_once()
        _received.append(signum)
        # Unwinds like Ctrl-C always does (loaders shut down, exit hooks run); what is already
        # written is complete, since checkpoints are renamed into place only once written.
        raise InterruptedTwice
    _received.append(signum)


def catch_stop_signals() -> None:
    """From now on SIGTERM, SIGUSR1 and SIGINT only set the stop flag (idempotent)."""
    global _catching_pid
    _catching_pid = os.getpid()
    for sig in SIGNALS:
        if signal.getsignal(sig) is not _remember:
            _previous[sig] = signal.signal(sig, _remember)
    if _releasing is not None:
        _releasing.clear()


def stop_if_requested_in_startup(waiting_for: str) -> None:
    """During start-up (no training step to end yet), a stop signal already received ends the
    process here: a wait for a failing server must not outlast a scheduler's notice."""
    main_thread = threading.current_thread() is threading.main_thread()
    in_startup = not _training and os.getpid() == _catching_pid and main_thread
    if _received and in_startup:
        signum = _received[0]
        raise TrainingStopped(f"stopped by signal {signum} ({signal.Signals(signum).name}) during start-up, while "
                              f"waiting for {waiting_for}; no step was trained, nothing to save",
                              EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED)


def release_stop_signals() -> None:
    """Give the signals back to the handlers they had before `catch_stop_signals`."""
    global _training
    _training = False
    _release_workers()
    for sig, handler in _previous.items():
        signal.signal(sig, handler)
    _previous.clear()
    _received.clear()


def dump_stacks_on_request() -> None:
    """`kill -USR2 PID` prints the stack of every thread of the process to its stderr: where
    a process that seems hung waits (a collective, a DataLoader worker), without stopping it."""
    # The process's own stderr (fd 2), also where `sys.stderr` is replaced (captured output).
    faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)


def stop_signals_in_workers(ctx: BaseContext) -> Callable[[int], None]:
    """The DataLoader `worker_init_fn` for workers started from `ctx`: a stop signal is the
    training process's to act on.

    Slurm signals every process of a job step; a worker that died of it would break the
    step the training process still has to finish before it saves.
    """
    global _releasing
    if _releasing is None:
        _releasing = ctx.Event()
        if signal.getsignal(signal.SIGTERM) is not _remember:  # no training holds the signals
            _releasing.set()
    return functools.partial(_take_stop_signals_in_worker, releasing=_releasing)


def _take_stop_signals_in_worker(worker_id: int, releasing: Event) -> None:
    global _releasing
    _releasing = releasing
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole process group
    signal.signal(signal.SIGTERM, _term_in_worker)


def _term_in_worker(signum, frame) -> None:
    if _releasing.is_set():  # the training process is shutting its workers down
        os._exit(0)  # quietly: a worker killed by a signal would be reported as a failure


class StopRequest:
    def __init__(self, accelerator: Accelerator):
        import torch

        global _training
        self.accelerator = accelerator
        self._flag = torch.zeros(1, device=accelerator.device)
        catch_stop_signals()
        _training = True

    @property
    def received(self) -> int | None:
        return _received[0] if _received else None

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_PREEMPTED

    def describe(self) -> str:
        if self.received == signal.SIGINT:
            return "stopped by Ctrl-C (SIGINT)"
        return f"stopped by signal {self.received} ({signal.Signals(self.received).name})"

    def requested(self) -> bool:
        """True on every rank once any rank has received a stop signal (collective)."""
        if self.accelerator.num_processes == 1:
            return self.received is not None
        self._flag.fill_(1.0 if self.received is not None else 0.0)
        return self.accelerator.reduce(self._flag.clone(), "sum").item() > 0

    def leaving(self) -> None:
        """The stop's checkpoint is saved and the process is on its way out: another Ctrl-C
        ends it at once (raised in the middle of the shutdown, it would only print a traceback)."""
        if signal.getsignal(signal.SIGINT) is _remember:
            signal.signal(signal.SIGINT, _exit_at_once)

    def restore(self) -> None:
        release_stop_signals()
