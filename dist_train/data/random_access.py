"""Read any sample of a tar shard directly: its byte span from an index, then one read.

The span of a sample (its headers and data) comes from the node's memory-mapped index of the
training shards (data/sample_index.py), or, for a shard not in it (a remote shard, whose copy
in the node's shard cache is read; a reader given no index), from the shard's headers, read
once per process when the shard is first read. A resumed run jumps to its position without
reading the samples before it, and each DataLoader worker reads only its own samples. A
remote shard's copy is pinned (a shared lock) while it is read and released after each batch
(`release`).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from dist_train.data import remote
from dist_train.data.sample_index import SampleIndex, header_spans
from dist_train.data.shard_cache import NextUse, ShardCache
from dist_train.data.shard_format import Shard
from dist_train.data.tar_index import read_sample
from dist_train.errors import DataError

MAX_OPEN_FILES = 16

# Spans of the shards this process indexed itself (those not in a node index), by URL.
_SPANS: dict[str, np.ndarray] = {}


class ShardReader:
    """`cache`: where remote shards are copied; `next_use` (from the node's plan, for the
    step being read) tells the cache which copies to evict first when it makes room. `index`:
    the node's index of the local shards (None: each shard indexed when first read)."""

    def __init__(self, cache: ShardCache | None = None, next_use: NextUse | None = None,
                 index: SampleIndex | None = None):
        self._files: OrderedDict = OrderedDict()
        self.cache = cache
        self.next_use = next_use
        self.index = index
        self.now = 0.0  # the training step being read, for the cache's eviction choices

    def sample(self, shard: Shard, index: int) -> dict:
        """The sample as webdataset's reader gives it: {"__key__", "__url__", ext: bytes}."""
        url = shard.url
        f = self._file(shard)
        span = self.index.span(shard, index) if self.index is not None else None
        if span is None:
            spans = _SPANS.get(url)
            if spans is None:
                _SPANS[url] = spans = header_spans(shard, local_path=f.name)
            if index >= len(spans):
                raise DataError(f"{url}: has {len(spans)} samples, sample {index} was asked for "
                                "(changed since it was indexed?)")
            span = int(spans[index][0]), int(spans[index][1])
        start, end = span
        f.seek(start)
        blob = f.read(end - start)
        key, members = read_sample(blob, f"{url}: sample {index} (bytes {start}-{end})")
        return {"__key__": key, "__url__": url, **members}

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
