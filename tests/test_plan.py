from __future__ import annotations

from collections import Counter

import pytest

from dist_train.data.index import Shard
from dist_train.data.plan import steps_per_epoch, train_slices, val_slices


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


@pytest.mark.parametrize("counts", LAYOUTS)
@pytest.mark.parametrize(
    ("world", "workers", "batch", "accum"), [(1, 1, 4, 1), (2, 2, 2, 1), (2, 2, 1, 3), (3, 4, 2, 2)]
)
def test_training_gives_every_rank_the_same_whole_batches(counts, world, workers, batch, accum):
    shards = make_shards(counts)
    steps = steps_per_epoch(sum(counts), world, accum, batch)
    seen = Counter()
    for rank in range(world):
        rank_samples = 0
        for worker in range(workers):
            slices = train_slices(shards, seed=3, epoch=1, rank=rank, world_size=world, worker=worker,
                                  num_workers=workers, batch_size=batch, grad_accum_steps=accum)
            n = sum(s.samples for s in slices)
            assert n % batch == 0  # whole batches per worker
            rank_samples += n
            seen.update(positions(slices))
        assert rank_samples == steps * accum * batch  # the same for every rank
    assert set(seen.values()) <= {1}  # no sample twice in an epoch
    assert sum(seen.values()) == steps * world * accum * batch
    assert sum(counts) - sum(seen.values()) < world * accum * batch  # less than one global batch left out


def test_shard_order_changes_per_epoch_and_is_reproducible():
    shards = make_shards([10] * 8)

    def order(epoch):
        slices = train_slices(shards, seed=0, epoch=epoch, rank=0, world_size=1, worker=0, num_workers=1,
                              batch_size=10, grad_accum_steps=1)
        return [s.url for s in slices]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


def test_more_slots_than_samples_still_balanced():
    shards = make_shards([3])
    for rank in range(2):
        total = sum(
            s.samples
            for worker in range(4)
            for s in train_slices(shards, seed=0, epoch=0, rank=rank, world_size=2, worker=worker, num_workers=4,
                                  batch_size=1, grad_accum_steps=1)
        )
        assert total == 1  # 3 samples, global batch 2: one step, one sample per rank
