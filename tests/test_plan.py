from __future__ import annotations

from collections import Counter

import pytest

from dist_train.data.eval_split import val_slices
from dist_train.data.shard_format import Shard


def make_shards(counts: list[int]) -> tuple[Shard, ...]:
    return tuple(Shard(f"s{i}.tar", n) for i, n in enumerate(counts))


def positions(slices) -> list[tuple[str, int]]:
    return [(s.url, i) for s in slices for i in range(s.start, s.stop)]


LAYOUTS = [[7, 11, 13], [256] * 6 + [158], [5], [3, 1, 2], [97], [1000, 1, 1, 1]]


@pytest.mark.parametrize("counts", LAYOUTS)
@pytest.mark.parametrize(("world", "workers"), [(1, 1), (2, 2), (3, 1), (4, 3), (8, 4)])
def test_validation_covers_every_sample_exactly_once(counts, world, workers):
    shards = make_shards(counts)
    seen = Counter()
    for rank in range(world):
        for worker in range(workers):
            slices = val_slices(shards, rank=rank, world_size=world, worker=worker, num_workers=workers)
            seen.update(positions(slices))
    assert sum(seen.values()) == sum(counts)
    assert set(seen.values()) == {1}
