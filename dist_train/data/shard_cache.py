"""A node-local cache of remote shards, bounded in bytes, shared by every process of the node.

Shards are fetched whole (data/remote.py) and read by offset from the local copy, like local
shards. The cache directory holds, per shard, `<hash>-<name>.tar` (complete and checked) or,
while it downloads, `.<hash>-<name>.tar.<bytes>.part`. All coordination is by file locks, so
it holds across the ranks of a node, their DataLoader workers and the prefetch thread, and
a process that dies leaves nothing locked:

- `.lock` (exclusive, held briefly) guards the bytes budget: choosing what to evict and
  reserving room for a download (the `.part` file names the bytes it will hold) happen
  together, so the files never sum to more than `data.cache_limit`.
- A `.part` file is locked exclusively by its downloader: another process that needs the
  shard waits for it rather than downloading it again (one download per shard per node); an
  unlocked `.part` is left over from a dead process and removed.
- A reader holds a shared lock on the copy it reads (`open_pinned`); eviction takes an
  exclusive lock without waiting, so a copy in use is never evicted. Eviction only unlinks:
  a file already open stays whole for whoever has it open.

The cache owns only the files it names (`<16 hex digits>-<name>`, `.<same>.<bytes>.part`,
`.lock`): anything else in the directory (a user's file, a folder) is neither counted nor
evicted. The default directory is private to the user (data/local_dirs.py).

Which copies to evict is the caller's knowledge (data/prefetch.py `NodePlan`: when each shard
is next needed): the one needed last (or never) goes first, and never one needed sooner than
the shard it makes room for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dist_train.config import DataConfig, parse_bytes
from dist_train.data import remote
from dist_train.data.local_dirs import private_temp_dir, usable_dir
from dist_train.errors import DataError

NEVER = float("inf")
POLL_S = 0.05
# How long a reader waits for room before giving up: every copy in use or needed sooner for
# this long means the limit cannot hold what the run reads at once.
ROOM_TIMEOUT_S = 300.0
HASH_CHUNK = 1 << 20

# A cached copy's file name -> the training step its shard is next needed at (NEVER: not again).
NextUse = Callable[[str], float]


@dataclass(frozen=True)
class RemoteObject:
    url: str
    bytes: int  # as the manifest or the server says; checked after download
    sha256: str = ""  # from the manifest, when it has one


# The names of the files the cache writes: a complete copy, a download in progress.
_COPY = re.compile(r"[0-9a-f]{16}-[^/]+")
_PART = re.compile(r"\.([0-9a-f]{16}-[^/]+)\.(\d{1,15})\.part")


class ShardCache:
    def __init__(self, directory: str | Path, limit: int):
        self.directory = usable_dir(directory, "data.cache_dir")
        self.limit = limit
        self._parts: dict[Path, BinaryIO] = {}  # downloads of this process, locked

    def path(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return self.directory / f"{digest}-{remote.basename(url)}"

    def open_pinned(self, obj: RemoteObject, next_use: NextUse | None = None, now: float = 0.0) -> BinaryIO:
        """The local copy, open and locked against eviction until closed; fetched first if it
        is not here (waiting for room while every other copy is in use or needed sooner)."""
        deadline = time.monotonic() + ROOM_TIMEOUT_S
        while True:
            self.fetch(obj, next_use, needed_at=now, wait_until=deadline)
            path = self.path(obj.url)
            try:
                f = open(path, "rb")  # noqa: SIM115 - returned open, closed by the reader
            except FileNotFoundError:  # evicted between fetch and open: fetch again
                continue
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            if os.fstat(f.fileno()).st_nlink:  # not evicted while we waited for the lock
                os.utime(path)  # recently used: evicted after copies not touched since
                return f
            f.close()

    def fetch(self, obj: RemoteObject, next_use: NextUse | None, needed_at: float,
              wait_until: float | None = None, keep_needed: bool = False) -> bool:
        """Make sure a checked copy is here: True when it is. Room is made by evicting copies
        not in use and not needed before `needed_at` (with `keep_needed`, only copies not
        needed again at all); without such room, False at once (`wait_until` None: prefetching)
        or, for a reader, wait until `wait_until`."""
        if obj.bytes > self.limit:
            raise DataError(f"{obj.url}: {obj.bytes} bytes, more than data.cache_limit ({self.limit} bytes)")
        path = self.path(obj.url)
        while not path.exists():
            with self._budget_lock():
                if path.exists():
                    break
                busy = self._download_in_progress(path)
                part = None if busy else self._reserve(obj, next_use, needed_at, keep_needed)
            if part is not None:
                self._download(obj, part, path)
                break
            if busy:  # another process downloads it: wait for its lock, then look again
                _wait_for_unlock(busy)
                continue
            if wait_until is None:
                return False
            if wait_until is not None and time.monotonic() > wait_until:
                raise DataError(f"{obj.url}: no room in the shard cache for {ROOM_TIMEOUT_S:.0f} s: every "
                                f"cached shard is in use or needed sooner; raise data.cache_limit ({self.limit} bytes)")
            time.sleep(POLL_S)
        return True

    def bytes_used(self) -> int:
        """Bytes of complete copies plus the room reserved by downloads in progress."""
        return sum(size for _, size, _ in self._entries())

    def _reserve(self, obj: RemoteObject, next_use: NextUse | None, needed_at: float,
                 keep_needed: bool) -> Path | None:
        """Evict what must go and create the download's `.part` file, locked; None: no room.
        Under the budget lock, where every `.part` is created and locked at once: one that is
        unlocked here was left by a process that died, and its reserved bytes are freed."""
        entries = [(path, size, is_part) for path, size, is_part in self._entries()
                   if not (is_part and _reclaimed(path))]
        free = self.limit - sum(size for _, size, _ in entries)
        if free < obj.bytes:
            candidates = []
            for path, size, is_part in entries:
                if is_part:
                    continue
                url_next = next_use(path.name) if next_use else NEVER
                if url_next > needed_at and (url_next == NEVER or not keep_needed):
                    candidates.append((-url_next, path.stat().st_mtime if path.exists() else 0.0, path, size))
            candidates.sort(key=lambda c: (c[0], c[1]))  # needed last first; then least recently used
            for _, _, path, size in candidates:
                if free >= obj.bytes:
                    break
                if _evict(path):
                    free += size
            if free < obj.bytes:
                return None
        part = path_for_part(self.path(obj.url), obj.bytes)
        f = open(part, "wb")  # noqa: SIM115 - its lock is held until the download ends
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        self._parts[part] = f
        return part

    def _download(self, obj: RemoteObject, part: Path, path: Path) -> None:
        f = self._parts.pop(part)
        try:
            remote.download(obj.url, str(part), obj.bytes)
            got = part.stat().st_size
            if got != obj.bytes:
                raise DataError(f"{obj.url}: downloaded {got} bytes, expected {obj.bytes} (changed on the server?)")
            if obj.sha256 and _sha256(part) != obj.sha256:
                raise DataError(f"{obj.url}: its sha256 differs from the manifest's (damaged or replaced)")
            # Under the budget lock: a directory scan is no snapshot, and one that ran during the
            # rename could miss the shard under both names, count its bytes as free and let the
            # cache grow a shard past data.cache_limit (seen: 860,160 of 806,400 bytes).
            with self._budget_lock():
                os.replace(part, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            f.close()

    def _download_in_progress(self, path: Path) -> Path | None:
        """The `.part` file of a live download of this copy, if one is running."""
        for part in self.directory.glob(f".{path.name}.*.part"):
            if not _reclaimed(part):  # else left by a process that died while downloading: gone now
                return part
        return None

    def _entries(self) -> Iterator[tuple[Path, int, bool]]:
        """(path, bytes, is a download in progress) of the cache's own files (module docstring):
        regular files by its names only, never another file or a folder found there."""
        for entry in os.scandir(self.directory):
            name = entry.name
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if part := _PART.fullmatch(name):
                    yield Path(entry.path), int(part.group(2)), True
                elif _COPY.fullmatch(name):
                    yield Path(entry.path), entry.stat(follow_symlinks=False).st_size, False
            except FileNotFoundError:  # evicted or finished while we looked
                continue

    @contextlib.contextmanager
    def _budget_lock(self) -> Iterator[None]:
        with open(self.directory / ".lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield

    def __getstate__(self) -> dict:  # sent to DataLoader workers: no open files
        return {"directory": self.directory, "limit": self.limit}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["limit"])


def evicted_last(cache: ShardCache, urls) -> NextUse:
    """For a reader with no plan (validation during training): copies of these shards (the
    training set's, prefetched by the training plan) are evicted only after every other copy."""
    names = {cache.path(url).name for url in urls}
    return lambda name: 1e18 if name in names else NEVER


def cache_for(data_cfg: DataConfig) -> ShardCache:
    """The node's shard cache as the config sets it: node-local by default (under the system's
    temporary directory, one per user, private: data/local_dirs.py)."""
    directory = data_cfg.cache_dir or private_temp_dir("dist-train-shards", "data.cache_dir")
    return ShardCache(directory, parse_bytes(data_cfg.cache_limit))


def path_for_part(path: Path, size: int) -> Path:
    return path.with_name(f".{path.name}.{size}.part")


def _evict(path: Path) -> bool:
    """Remove a copy nobody reads now (it holds no shared lock); False if one does."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return True
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        path.unlink(missing_ok=True)
        return True


def _wait_for_unlock(part: Path) -> None:
    """Block until the process downloading into `part` is done (its lock is released)."""
    try:
        with open(part, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    except FileNotFoundError:
        pass  # done already


def _reclaimed(part: Path) -> bool:
    """Remove a `.part` no live download holds (its process died); True if it is gone."""
    if _locked(part):
        return False
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
    return True


def _locked(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except FileNotFoundError:
        return False
    return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
