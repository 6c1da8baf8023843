"""Resumable checkpoints reach the disk on a thread of their own while training goes on.

The training thread takes the snapshot (every tensor copied to host memory, the other values
deep-copied: the next step changes the originals) and hands the write to this thread: the
files, their SHA-256, the fsyncs and the rename that makes the checkpoint count, then the
rotation of old ones. One write is in flight at a time: the next checkpoint, a stop and the
end of the run wait for it first, and a write that failed is raised there, its one line as
when written in place. A process killed mid-write leaves the temporary directory and the
previous checkpoint, which is what a resume finds (checkpoint/atomic.py).

Safetensors, hashlib and the file system calls release the GIL, so the write costs the
training thread next to nothing on a spare core.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class CheckpointWriter:
    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def submit(self, write: Callable[[], object]) -> None:
        """Run `write` on the writer's thread, after the write before it has finished."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
        self._pending = self._executor.submit(write)

    def wait(self) -> None:
        """Until the write in flight is on disk; its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None
