"""DataLoader worker processes: forked from a fork server, never from the training process.

By the time a training process starts workers it has threads: gloo's, wandb's, the loaders'
queue feeders. `fork()` copies every lock as it is at that instant, held or not, and a child
that takes a lock held by a thread it did not inherit waits forever. The interpreter's own
locks are among them (CPython gh-112275 is one such hang, on 3.11 and older). A forked
worker that hangs hangs its rank, and the other ranks wait on it in the next collective.
Python 3.12 warns about every fork of a process with threads; 3.14 makes the fork server
the default on Linux.

So workers start from a fork server: one small process per training process that forks a
worker on request. `dist-train train` forks it from the training process itself once that
has imported everything and before it starts any thread (`fork_server_from_here`): the
server, and every worker forked from it, then share the training process's memory (torch,
torchvision and the pipeline, imported once per node-rank, not twice) and its start costs
nothing. Where the training process already has threads at that point (a remote dataset's
client may start some), or outside `dist-train train`, the server is started by exec (so it
has no threads) and imports the input pipeline itself (worker_server.py). Either way a
worker's first batch comes about as soon as one forked from the training process would
(benchmarks/RESULTS.md). What a worker needs travels to it pickled: the dataset object (with
the path of the node's training index, data/sample_index.py), and the shared counters and
events, made with this context.
"""

from __future__ import annotations

import functools
import gc
import inspect
import multiprocessing
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable
from multiprocessing import connection, forkserver, resource_tracker, util
from multiprocessing.context import BaseContext

from dist_train.runtime.preemption import SIGNALS, dump_stacks_on_request, stop_signals_in_workers

SERVER_MODULE = "dist_train.data.worker_server"


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


def fork_server_from_here() -> bool:
    """Start the fork server by forking this process, if no server runs yet and Python runs no
    thread but the main one here. Returns whether it did; if not, `start_helpers` starts one
    by exec. (Native threads that libraries start on import, such as OpenBLAS's pool that
    numpy starts, are idle and reset themselves at a fork, as they do for DataLoader workers
    forked the usual way; the threads that hold locks in use, gloo's, wandb's, a remote
    client's, are Python's or start later, with the accelerator.)

    This is multiprocessing's `ForkServer.ensure_running` with `fork` in place of the exec:
    the same listening socket, the same pipe that tells the server its clients are gone, the
    same loop (`forkserver.main`), so the workers' start and the DataLoader's protocol are
    multiprocessing's own.
    """
    server = forkserver._forkserver
    if not forked_server_fits() or server._forkserver_pid is not None or threading.active_count() > 1:
        return False
    start_helpers(fork_server=False)  # the resource tracker: its descriptor is inherited, as by an exec'd server
    with socket.socket(socket.AF_UNIX) as listener:
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        # Frozen before the fork, the imported objects are never scanned by either process's
        # collector: neither writes to (and so copies) the pages they share. (No collection
        # first: it would take 0.15 s of the start-up, for the few cycles imports leave.)
        gc.freeze()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # until the server ignores them
        pid = os.fork()
        if pid == 0:  # the server: never returns into the training process's code
            code = 0
            try:
                os.close(alive_w)
                prepare_server()
                forkserver.main(listener.fileno(), alive_r, [])
            except SystemExit:  # its clients are gone
                pass
            except BaseException:
                traceback.print_exc()  # the DataLoader then reports its workers' failure to start
                code = 1
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(alive_r)
    server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
    return True


# What `fork_server_from_here` sets and calls of multiprocessing's fork server, as CPython
# 3.11-3.13 have them. 3.14 adds an authentication key (`authkey_r`, `_forkserver_authkey`)
# that clients must present: an interpreter whose server differs gets the standard one.
FORKSERVER_FIELDS = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid")
FORKSERVER_MAIN = ("listener_fd", "alive_r", "preload", "main_path", "sys_path")


def forked_server_fits() -> bool:
    """Whether this interpreter's fork server is the one `fork_server_from_here` was written for."""
    server = forkserver._forkserver
    try:
        parameters = tuple(inspect.signature(forkserver.main).parameters)
    except (TypeError, ValueError):
        return False
    return (parameters == FORKSERVER_MAIN and all(hasattr(server, name) for name in FORKSERVER_FIELDS)
            and not any("authkey" in name for name in vars(server)))


def prepare_server() -> None:
    """Set a fork server up before it forks any worker; the workers inherit its signals
    (preemption.py):
    - the stop signals are ignored (and unblocked: the server may start with them blocked,
      `start_helpers`). Under Slurm every process of the job step receives SIGUSR1 or SIGTERM;
      the server must outlive it (it ends when its training process does), and a worker
      ignores it too until its `worker_init_fn` sets the worker's own handlers;
    - SIGUSR2 prints the stacks, as in the training process.
    Last it freezes what is imported (`gc.freeze`): the collector of a worker then never scans
    those objects, which a worker's first full collection did before its first batch (the
    delay: benchmarks/RESULTS.md), nor touches their memory, which would copy pages the
    workers could share with the server.
    """
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    dump_stacks_on_request()
    gc.collect()
    gc.freeze()


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
