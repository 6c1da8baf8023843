"""The tests' launcher helpers leave nothing running: a launched job's ranks live in sessions of
their own (torchrun starts them so) and would outlive a killed launcher."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from .conftest import kill_tree, run_reaped

# A stand-in launcher: starts a "rank" in a new session, prints its pid, then waits forever.
LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(600)
"""


def assert_ends(pid: int) -> None:
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def test_a_timed_out_launch_is_killed_with_the_ranks_it_started():
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        run_reaped([sys.executable, "-c", LAUNCHER], timeout=3)
    assert_ends(int(timed_out.value.stdout.split()[0]))


def test_kill_tree_reaches_a_rank_in_another_session():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    kill_tree(launcher)
    launcher.wait(timeout=10)
    assert_ends(rank)
