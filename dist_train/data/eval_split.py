"""Which samples each process and DataLoader worker reads to see a set once: a pure function.

Shards are read as one sequence, cut into contiguous spans, first one per process (rank),
then one per worker within a rank. A span may start or end inside a shard, so any number of
shards serves any number of ranks x workers, and every sample is read exactly once across
all ranks, with no padding: metrics computed from summed counts equal the single-process
value on the whole set. Ranks may get one sample more or less than each other; evaluation
has no per-batch collectives. (Training order: data/order.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.data.shard_format import Shard


@dataclass(frozen=True)
class Slice:
    shard: Shard
    start: int  # first sample index within the shard
    stop: int  # one past the last

    @property
    def url(self) -> str:
        return self.shard.url

    @property
    def remote(self) -> bool:
        return self.shard.remote

    @property
    def samples(self) -> int:
        return self.stop - self.start


def val_slices(
    shards: tuple[Shard, ...], *, rank: int, world_size: int, worker: int, num_workers: int
) -> list[Slice]:
    """This worker's share of the validation set; all shares together cover it exactly once."""
    total = sum(s.samples for s in shards)
    rank_first, rank_count = _even_share(total, world_size, rank)
    first, count = _even_share(rank_count, num_workers, worker)
    start = rank_first + first
    return _cut(list(shards), start, start + count)


def _even_share(total: int, parts: int, index: int) -> tuple[int, int]:
    """(offset, size) of part `index` when `total` items are split into `parts` near-equal runs."""
    base, extra = divmod(total, parts)
    offset = index * base + min(index, extra)
    return offset, base + (1 if index < extra else 0)


def _cut(shards: list[Shard], start: int, stop: int) -> list[Slice]:
    """The slices of shards that cover positions [start, stop) of their concatenation."""
    slices = []
    offset = 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.samples)
        if lo < hi:
            slices.append(Slice(shard, lo - offset, hi - offset))
        offset += shard.samples
        if offset >= stop:
            break
    return slices
