"""DataLoader workers start from a fork server (dist_train/workers.py): they inherit no
lock held by a thread of the training process, they end with it however it ends, and under
Slurm's signals neither they nor multiprocessing's helper processes die before it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from torch.utils.data import DataLoader, IterableDataset

from dist_train import workers

from .conftest import REPO
from .test_process_reaping import assert_ends

# Held by a thread of the test process while a worker starts; a worker that takes it finds
# it free only if it is not a copy of this process.
HELD_BY_A_THREAD = threading.Lock()


class TakesTheLock(IterableDataset):
    def __iter__(self):
        with HELD_BY_A_THREAD:
            yield os.getpid()


class WhoAmI(IterableDataset):
    def __iter__(self):
        yield {"pid": os.getpid(), "parent": os.getppid(), "training_process": multiprocessing.parent_process().pid}


def test_a_worker_inherits_no_lock_held_by_a_thread_of_the_training_process():
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with HELD_BY_A_THREAD:
            taken.set()
            release.wait()

    threading.Thread(target=hold, daemon=True).start()
    taken.wait()
    try:
        # The control: a worker forked from this process waits for the lock forever.
        forked = DataLoader(TakesTheLock(), batch_size=None, num_workers=1, timeout=5,
                            multiprocessing_context="fork")
        with pytest.raises(RuntimeError, match="timed out"):
            list(forked)
        # Ours: the worker's copy of the module has a lock of its own.
        ours = DataLoader(TakesTheLock(), batch_size=None, timeout=60, **workers.loader_options(1))
        assert len(list(ours)) == 1
    finally:
        release.set()


def test_a_worker_is_forked_by_the_server_and_knows_the_training_process():
    [seen] = DataLoader(WhoAmI(), batch_size=None, timeout=60, **workers.loader_options(1))
    assert seen["pid"] != os.getpid()
    assert seen["parent"] != os.getpid()  # the fork server
    assert seen["training_process"] == os.getpid()


# A training process in miniature: the helpers started as `fit` starts them, one persistent
# worker running, its pid and the helpers' printed; then it waits to be signalled or killed.
TRAINING_PROCESS = """
import json, os, sys, time
from torch.utils.data import DataLoader
from dist_train import workers
from dist_train.preemption import catch_stop_signals
from tests.test_workers import WhoAmI

catch_stop_signals()
workers.start_helpers()
loader = DataLoader(WhoAmI(), batch_size=None, persistent_workers=True, **workers.loader_options(1))
[seen] = list(loader)
print(json.dumps({"worker": seen["pid"], "server": seen["parent"]}), flush=True)
time.sleep(600)
"""


def _start_training_process() -> tuple[subprocess.Popen, dict[str, int]]:
    process = subprocess.Popen([sys.executable, "-c", TRAINING_PROCESS], stdout=subprocess.PIPE, text=True, cwd=REPO)
    pids = json.loads(process.stdout.readline())
    [tracker] = [p.pid for p in psutil.Process(process.pid).children()
                 if "resource_tracker" in " ".join(p.cmdline())]
    return process, {**pids, "tracker": tracker}


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_helpers_and_workers_outlive_the_stop_signals_that_slurm_sends_to_every_process(sig):
    process, pids = _start_training_process()
    try:
        for pid in pids.values():
            os.kill(pid, sig)
        time.sleep(1)
        for name, pid in pids.items():
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, f"the {name} died of {sig.name}"
    finally:
        process.kill()
        process.wait()


def test_workers_and_server_end_with_a_training_process_killed_outright():
    process, pids = _start_training_process()
    process.kill()  # what the OOM killer does: no exit handler runs
    process.wait()
    for pid in pids.values():
        assert_ends(pid)
