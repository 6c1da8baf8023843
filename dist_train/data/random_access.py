"""Read any sample of a tar shard directly: an index of member offsets, then seek + read.

The index of a shard (each sample's key and, per member, offset and size) is built from the
tar headers alone, once per training process, so a resumed run jumps to its position without
reading the samples before it, and each DataLoader worker reads only its own samples.
A remote shard is read the same way from its copy in the node's shard cache, which the
reader pins (a shared lock) while it reads and releases after each batch (`release`).
"""

from __future__ import annotations

from collections import OrderedDict

from dist_train.data import remote
from dist_train.data.resolve import Shard, usable_index
from dist_train.data.shard_cache import NextUse, ShardCache
from dist_train.data.tar_index import TarIndex
from dist_train.errors import DataError

MAX_OPEN_FILES = 16


# Shard indexes of this process, by path. Filled in the main process before DataLoader
# workers start (`preload`), and handed to each worker as it starts (`indexes_read`, `adopt`),
# so that workers do not each read the same headers again.
_INDEXES: dict[str, TarIndex] = {}


def preload(shards: list[Shard]) -> None:
    """Index local shards (a remote shard is indexed when its copy is first read)."""
    for shard in shards:
        if shard.url not in _INDEXES and not shard.remote:
            _INDEXES[shard.url] = usable_index(shard)


def indexes_read(urls: list[str]) -> dict[str, TarIndex]:
    """The indexes of these shards that this process has read so far."""
    return {url: _INDEXES[url] for url in urls if url in _INDEXES}


def adopt(indexes: dict[str, TarIndex]) -> None:
    """Use indexes read by another process (the training process, in a worker)."""
    _INDEXES.update(indexes)


class ShardReader:
    """`cache`: where remote shards are copied; `next_use` (from the node's plan, for the
    step being read) tells the cache which copies to evict first when it makes room."""

    def __init__(self, cache: ShardCache | None = None, next_use: NextUse | None = None):
        self._files: OrderedDict = OrderedDict()
        self.cache = cache
        self.next_use = next_use
        self.now = 0.0  # the training step being read, for the cache's eviction choices

    def sample(self, shard: Shard, index: int) -> dict:
        """The sample as webdataset's reader gives it: {"__key__", "__url__", ext: bytes}."""
        url = shard.url
        f = self._file(shard)
        entries = _INDEXES.get(url)
        if entries is None:
            _INDEXES[url] = entries = usable_index(shard, local_path=f.name)
        if index >= len(entries):
            raise DataError(f"{url}: has {len(entries)} samples, sample {index} was asked for "
                            "(changed since it was indexed?)")
        key, members = entries[index]
        sample = {"__key__": key, "__url__": url}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise DataError(f"{url}: sample {key!r}: member .{ext} is truncated")
            sample[ext] = data
        return sample

    def _file(self, shard: Shard):
        f = self._files.pop(shard.url, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
            if shard.remote:
                if self.cache is None:
                    raise DataError(f"{shard.url}: a remote shard, and this reader has no shard cache")
                f = self.cache.open_pinned(shard.as_remote_object(), self.next_use, self.now)
            else:
                f = open(shard.url, "rb")  # noqa: SIM115 - kept open across samples, closed in close()
        self._files[shard.url] = f
        return f

    def release(self) -> None:
        """Unpin the remote copies read so far: the cache may evict them once the run has
        no further use for them. (Local files stay open: reopening them gains nothing.)"""
        for url in [url for url, f in self._files.items() if remote.is_remote(url)]:
            self._files.pop(url).close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
