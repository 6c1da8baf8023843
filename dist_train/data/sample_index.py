"""Where each training sample lies in its shard: one memory-mapped index per node.

For every usable sample of the local training shards, the span of its bytes in the tar (its
headers and data, [start, end)); a reader reads a span in one piece and parses the few
headers inside it (tar_index.read_sample). 16 bytes a sample, in one file per set of shards
and node. The first process of the node to take the file's lock builds it, from the spans
`make-shards` writes beside its shards (`train.spans.npy`), else by reading the tar headers;
the other processes of the node, and later runs on the same shards (a requeue, a sweep), map
the file it wrote. Mapped read-only, the page cache holds one copy per node however many
processes read it, and a DataLoader worker touches only the pages of its own samples: the
index costs a worker kilobytes, not a copy, and pickled to a worker it is a path and a row per
shard. (Before, each process held a Python list of dicts, ~600 bytes a sample, and pickled
it to every worker.)

The file lies in $DIST_TRAIN_INDEX_DIR, else in the temporary directory (node-local where
Slurm gives jobs their own TMPDIR), named by a hash of the shards' paths, sizes, modification
and change times and exclusions: a shard that changes gets a new index (the change time,
which no user can set, tells a file replaced by another of the same size and mtime). When
the index is built, each shard whose dataset.json gives a sha256 is hashed and checked
(in parallel, once per node and shard version): a shard replaced or damaged since make-shards
wrote it stops the run in one line. Remote shards are not in it:
each is indexed when its copy in the shard cache is first read (data/random_access.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

from dist_train import atomic_file
from dist_train.checkpoint.atomic import sha256_file
from dist_train.data.local_dirs import private_temp_dir, usable_dir
from dist_train.data.resolve import usable_index
from dist_train.data.shard_format import Shard
from dist_train.data.tar_index import read_sample
from dist_train.errors import DataError

FORMAT = 1  # in the file name's hash: a new layout never reads an old file


class SampleIndex:
    """The spans of the samples of some local shards, rows in one mapped (N, 2) int64 array."""

    def __init__(self, path: str, first_rows: dict[str, int]):
        self.path = path
        self.first_rows = first_rows  # shard URL -> the row of its sample 0
        self._spans: np.ndarray | None = None  # mapped when first read (in a worker: there)

    def span(self, shard: Shard, index: int) -> tuple[int, int] | None:
        """[start, end) of the shard's sample `index`; None for a shard not in this index."""
        row = self.first_rows.get(shard.url)
        if row is None:
            return None
        if not 0 <= index < shard.samples:
            raise DataError(f"{shard.url}: has {shard.samples} samples, sample {index} was asked for")
        if self._spans is None:
            # A plain array over the mapping: np.memmap's indexing costs microseconds a sample.
            self._spans = np.load(self.path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
        start, end = self._spans[row + index].tolist()
        return start, end

    def __getstate__(self) -> dict:  # to a DataLoader worker: the path, not the mapping
        return {"path": self.path, "first_rows": self.first_rows}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def node_index(shards: Sequence[Shard]) -> SampleIndex:
    """The index of these shards' local ones, built on this node if no process has yet."""
    local = [s for s in shards if not s.remote]
    firsts = np.cumsum([0, *(s.samples for s in local)]).tolist()
    path = index_dir() / f"spans-{_identity(local)}.npy"
    if not _complete(path, local, firsts):
        with _locked(path.with_suffix(".lock")):
            if not _complete(path, local, firsts):  # not built meanwhile by another process
                check_hashes(local)
                spans = [_shard_spans(s) for s in local]
                try:
                    with atomic_file.replacing(path) as tmp, open(tmp, "wb") as f:
                        np.save(f, np.concatenate(spans) if spans else np.zeros((0, 2), np.int64),
                                allow_pickle=False)
                except OSError as exc:
                    raise DataError(f"{path}: cannot write the training index ({exc.strerror or exc}); set "
                                    "DIST_TRAIN_INDEX_DIR to a writable directory with room") from None
    return SampleIndex(str(path), {s.url: first for s, first in zip(local, firsts, strict=False)})


def index_dir() -> Path:
    """$DIST_TRAIN_INDEX_DIR, else a directory private to the user (data/local_dirs.py): an
    index planted there would be trusted for where each sample lies."""
    if chosen := os.environ.get("DIST_TRAIN_INDEX_DIR"):
        return usable_dir(chosen, "DIST_TRAIN_INDEX_DIR")
    return private_temp_dir("dist-train-index", "DIST_TRAIN_INDEX_DIR")


def check_hashes(shards: Sequence[Shard]) -> None:
    """Each shard with a sha256 from its manifest hashed (threads: hashlib releases the GIL, and
    shards are many) and compared; the first that differs is named."""
    checked = [s for s in shards if s.sha256]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for shard, digest in zip(checked, pool.map(lambda s: sha256_file(Path(s.url)), checked), strict=True):
            if digest != shard.sha256:
                raise DataError(f"{shard.url}: its sha256 differs from its dataset.json's (replaced or damaged since "
                                "make-shards wrote it)")


def _identity(shards: Sequence[Shard]) -> str:
    described = []
    for s in shards:
        try:
            stat = os.stat(s.url)
        except OSError as exc:
            raise DataError(f"{s.url}: unreadable shard ({exc})") from None
        described.append([os.path.abspath(s.url), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, s.samples,
                          sorted(s.exclude), s.truncated, s.sha256])
    return hashlib.blake2b(json.dumps([FORMAT, described]).encode(), digest_size=12).hexdigest()


def _complete(path: Path, shards: Sequence[Shard], firsts: list[int]) -> bool:
    """Whether `path` holds these shards' index: `firsts[-1]` rows of int64 spans, each shard's
    in order, apart and inside its file. A file cut short, damaged or not written by us (the
    spans of one sample repeated, say) is not; it is built again."""
    try:
        spans = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    if spans.dtype != np.int64 or spans.shape != (firsts[-1], 2):
        return False
    for shard, first, end in zip(shards, firsts, firsts[1:], strict=False):
        rows = np.asarray(spans[first:end])
        if len(rows) and not ((rows[:, 0] >= 0).all() and (rows[:, 1] > rows[:, 0]).all()
                              and (rows[1:, 0] >= rows[:-1, 1]).all() and rows[-1, 1] <= os.path.getsize(shard.url)):
            return False
    return True


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def _shard_spans(shard: Shard) -> np.ndarray:
    written = _written_spans(shard) if shard.spans_file and not shard.damaged else None
    if written is not None:
        return written
    spans = header_spans(shard)
    if len(spans) != shard.samples:
        raise DataError(f"{shard.url}: has {len(spans)} samples, the dataset says {shard.samples} "
                        "(changed since it was written?)")
    return spans


def header_spans(shard: Shard, local_path: str = "") -> np.ndarray:
    """The spans of the shard's usable samples, from its tar headers, as an (N, 2) array.
    `local_path`: where its bytes are (a remote shard's cached copy)."""
    return np.asarray(usable_index(shard, local_path)[1], dtype=np.int64).reshape(-1, 2)


def _written_spans(shard: Shard) -> np.ndarray | None:
    """The shard's rows of the spans make-shards wrote, if they fit the shard as it is: in
    order, inside the file, its first and last span each holding one whole sample (else None:
    the shard is indexed from its headers instead). A span between them that no longer holds
    its sample is named when it is read (tar_index.read_sample)."""
    spans = _spans_file(shard.spans_file)
    rows = spans[shard.spans_row:shard.spans_row + shard.samples] if spans is not None else None
    if rows is None or len(rows) != shard.samples or not len(rows):
        return None
    rows = np.array(rows)
    starts, ends = rows[:, 0], rows[:, 1]
    if not ((starts >= 0).all() and (ends > starts).all() and (starts[1:] >= ends[:-1]).all()
            and ends[-1] <= os.path.getsize(shard.url)):
        return None
    with open(shard.url, "rb") as f:
        for start, end in (rows[0], rows[-1]):
            f.seek(start)
            try:
                read_sample(f.read(end - start), shard.url)
            except DataError:
                return None
    return rows


@lru_cache(maxsize=8)
def _spans_file(path: str) -> np.ndarray | None:
    try:
        spans = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return spans if spans.dtype == np.int64 and spans.ndim == 2 and spans.shape[1] == 2 else None
