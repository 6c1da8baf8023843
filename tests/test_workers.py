"""DataLoader workers start from a fork server (dist_train/data/workers.py): they inherit no
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

from dist_train.data import workers

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
from dist_train.data import workers
from dist_train.runtime.preemption import catch_stop_signals
from tests.test_workers import WhoAmI

catch_stop_signals()
if sys.argv[1] == "forked":
    assert workers.fork_server_from_here()
workers.start_helpers()
loader = DataLoader(WhoAmI(), batch_size=None, persistent_workers=True, **workers.loader_options(1))
[seen] = list(loader)
print(json.dumps({"worker": seen["pid"], "server": seen["parent"]}), flush=True)
time.sleep(600)
"""


def _start_training_process(server: str) -> tuple[subprocess.Popen, dict[str, int]]:
    process = subprocess.Popen([sys.executable, "-c", TRAINING_PROCESS, server], stdout=subprocess.PIPE, text=True,
                               cwd=REPO)
    pids = json.loads(process.stdout.readline())
    [tracker] = [p.pid for p in psutil.Process(process.pid).children()
                 if "resource_tracker" in " ".join(p.cmdline())]
    return process, {**pids, "tracker": tracker}


SERVERS = ["forked", "exec"]  # forked from the training process (`dist-train train`), or started by exec


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_helpers_and_workers_outlive_the_stop_signals_that_slurm_sends_to_every_process(sig, server):
    process, pids = _start_training_process(server)
    try:
        for pid in pids.values():
            os.kill(pid, sig)
        time.sleep(1)
        for name, pid in pids.items():
            assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, f"the {name} died of {sig.name}"
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("server", SERVERS)
def test_workers_and_server_end_with_a_training_process_killed_outright(server):
    process, pids = _start_training_process(server)
    process.kill()  # what the OOM killer does: no exit handler runs
    process.wait()
    for pid in pids.values():
        assert_ends(pid)


def test_a_forked_server_shares_the_training_process_memory_and_its_workers_too():
    process, pids = _start_training_process("forked")
    try:
        server = psutil.Process(pids["server"])
        assert server.ppid() == process.pid
        # torch, torchvision and the pipeline are the training process's pages, not copies:
        # what the server and its worker hold of their own is a small part of what they use.
        for pid in (pids["server"], pids["worker"]):
            memory = psutil.Process(pid).memory_full_info()
            assert memory.uss < 0.2 * memory.rss, (pid, memory)
    finally:
        process.kill()
        process.wait()


def test_no_server_is_forked_from_a_process_running_a_thread():
    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    thread.start()
    try:
        assert not workers.fork_server_from_here()  # a thread may hold a lock the fork would copy
    finally:
        release.set()
        thread.join()


def test_a_fork_server_unlike_the_one_written_for_falls_back_to_the_standard_one(monkeypatch):
    """CPython 3.14's fork server takes an authentication key (a new `authkey_r` argument and
    field): faked here, the training process does not fork its own server (which would not
    present the key) and `start_helpers` starts the standard one instead."""
    from multiprocessing import forkserver

    from dist_train.data import workers

    assert workers.forked_server_fits()  # this interpreter's (3.11-3.13): the fork path is taken

    def main_with_a_key(listener_fd, alive_r, preload, main_path=None, sys_path=None, *, authkey_r=None):
        raise AssertionError("never called")

    monkeypatch.setattr(forkserver, "main", main_with_a_key)
    assert not workers.forked_server_fits() and workers.fork_server_from_here() is False
    monkeypatch.undo()
    monkeypatch.setattr(forkserver._forkserver, "_forkserver_authkey", b"key", raising=False)
    assert not workers.forked_server_fits()
