"""DataLoader worker processes: forked from a fork server, never from the training process.

By the time a training process starts workers it has threads: gloo's, wandb's, the loaders'
queue feeders. `fork()` copies every lock as it is at that instant, held or not, and a child
that takes a lock held by a thread it did not inherit waits forever. The interpreter's own
locks are among them (CPython gh-112275 is one such hang, on 3.11 and older). A forked
worker that hangs hangs its rank, and the other ranks wait on it in the next collective.
Python 3.12 warns about every fork of a process with threads; 3.14 makes the fork server
the default on Linux.

So workers start from a fork server: one small process per training process, started by
exec (so it has no threads), that imports the input pipeline once (worker_server.py) and
forks a worker on request. A worker's first batch then comes about as soon as one forked from
the training process would (benchmarks/RESULTS.md), not after the seconds a fresh interpreter
spends importing torch. What a worker needs travels to it pickled: the dataset
object, including the shard indexes read so far (data/pipeline.py), and the shared counters
and events, made with this context.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing import forkserver, resource_tracker
from multiprocessing.context import BaseContext

from dist_train.preemption import SIGNALS, stop_signals_in_workers

SERVER_MODULE = "dist_train.worker_server"


def context() -> BaseContext:
    """The multiprocessing context of DataLoader workers, and of what they share."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([SERVER_MODULE])  # read when the server starts
    return ctx


def start_helpers(fork_server: bool = True) -> None:
    """Start multiprocessing's helper processes now: its resource tracker (which unlinks the
    shared counters' semaphores should this process die) and the fork server, whose imports
    then overlap the training process's set-up instead of delaying the first batch.

    They start with the stop signals blocked, which they inherit: under Slurm every process of
    the job step receives SIGUSR1 or SIGTERM, and neither helper would otherwise survive it.
    """
    context()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        resource_tracker.ensure_running()
        if fork_server:
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def loader_options(num_workers: int) -> dict:
    """The DataLoader arguments for `num_workers` worker processes (none: read in-process)."""
    if num_workers == 0:
        return {"num_workers": 0}
    ctx = context()
    return {"num_workers": num_workers, "multiprocessing_context": ctx,
            "worker_init_fn": functools.partial(_init_worker, stop_signals=stop_signals_in_workers(ctx))}


def _init_worker(worker_id: int, stop_signals: Callable[[int], None]) -> None:
    _exit_with_training_process()
    stop_signals(worker_id)


def _exit_with_training_process() -> None:
    """End this worker when the training process that asked for it ends, however it ends.

    torch's workers watch their parent process, here the fork server, which lives on as long
    as any worker does: a training process killed outright (the OOM killer, a lost peer's
    launcher) would leave its workers and server running forever, holding the job's output
    open. multiprocessing gives a worker the training process as `parent_process()`.
    """
    training_process = multiprocessing.parent_process()

    def watch() -> None:
        training_process.join()
        os._exit(1)

    threading.Thread(target=watch, name="dist-train-parent-watch", daemon=True).start()
