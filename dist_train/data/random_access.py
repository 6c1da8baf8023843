"""Read any sample of a local tar shard directly: an index of member offsets, then seek + read.

The index of a shard (each sample's key and, per member, offset and size) is built from the
tar headers alone, once per training process, so a resumed run jumps to its position without
reading the samples before it, and each DataLoader worker reads only its own samples.
"""

from __future__ import annotations

from collections import OrderedDict

from dist_train.data.resolve import Shard, usable_index
from dist_train.data.tar_index import TarIndex
from dist_train.errors import DataError

MAX_OPEN_FILES = 16


# Shard indexes of this process, by path. Filled in the main process before DataLoader
# workers start (`preload`), and handed to each worker as it starts (`indexes_read`, `adopt`),
# so that workers do not each read the same headers again.
_INDEXES: dict[str, TarIndex] = {}


def preload(shards: list[Shard]) -> None:
    for shard in shards:
        if shard.url not in _INDEXES:
            _INDEXES[shard.url] = usable_index(shard)


def indexes_read(urls: list[str]) -> dict[str, TarIndex]:
    """The indexes of these shards that this process has read so far."""
    return {url: _INDEXES[url] for url in urls if url in _INDEXES}


def adopt(indexes: dict[str, TarIndex]) -> None:
    """Use indexes read by another process (the training process, in a worker)."""
    _INDEXES.update(indexes)


class ShardReader:
    def __init__(self):
        self._files: OrderedDict = OrderedDict()

    def sample(self, shard: Shard, index: int) -> dict:
        """The sample as webdataset's reader gives it: {"__key__", "__url__", ext: bytes}."""
        url = shard.url
        entries = _INDEXES.get(url)
        if entries is None:
            preload([shard])
            entries = _INDEXES[url]
        if index >= len(entries):
            raise DataError(f"{url}: has {len(entries)} samples, sample {index} was asked for "
                            "(changed since it was indexed?)")
        key, members = entries[index]
        f = self._file(url)
        sample = {"__key__": key, "__url__": url}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise DataError(f"{url}: sample {key!r}: member .{ext} is truncated")
            sample[ext] = data
        return sample

    def _file(self, url: str):
        f = self._files.pop(url, None)
        if f is None:
            if len(self._files) >= MAX_OPEN_FILES:
                self._files.popitem(last=False)[1].close()
            f = open(url, "rb")  # noqa: SIM115 - kept open across samples, closed in close()
        self._files[url] = f
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
