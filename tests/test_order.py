from __future__ import annotations

from collections import Counter

import pytest
import torch

from dist_train.config import DataConfig
from dist_train.data.order import EpochOrder, OrderSpec, micro_batch_positions
from dist_train.data.pipeline import TrainStreamSpec, make_train_loader
from dist_train.data.shard_format import Shard, ShardSet
from dist_train.errors import ConfigError


def shards(counts):
    return tuple(Shard(f"s{i}.tar", n) for i, n in enumerate(counts))


@pytest.mark.parametrize("counts", [[7, 11, 13], [256] * 6 + [158], [97], [3, 1, 2, 50]])
@pytest.mark.parametrize(("global_batch", "partitions", "window"), [(4, 1, 5), (8, 2, 3), (12, 4, 100), (6, 3, 1)])
def test_an_epoch_visits_distinct_samples(counts, global_batch, partitions, window):
    order = EpochOrder(shards(counts), OrderSpec(0, global_batch, partitions, window), epoch=2)
    seen = Counter(order.sample(q) for q in range(order.steps * global_batch))
    assert set(seen.values()) == {1}
    assert order.steps == sum(counts) // global_batch


def test_order_is_reproducible_and_changes_per_epoch():
    spec = OrderSpec(seed=5, global_batch=8, partitions=2, window=16)
    first = [EpochOrder(shards([40, 40]), spec, 0).sample(q) for q in range(80)]
    assert first == [EpochOrder(shards([40, 40]), spec, 0).sample(q) for q in range(80)]
    assert first != [EpochOrder(shards([40, 40]), spec, 1).sample(q) for q in range(80)]


@pytest.mark.parametrize(("world", "accum", "batch"), [(1, 8, 3), (2, 4, 3), (4, 2, 3), (8, 1, 3), (2, 2, 6)])
def test_every_layout_of_processes_takes_the_same_global_batches(world, accum, batch):
    global_batch = 24
    for step in range(3):
        taken = sorted(q for rank in range(world) for micro in range(accum)
                       for q in micro_batch_positions(step, micro, rank, world, accum, batch, global_batch))
        assert taken == list(range(step * global_batch, (step + 1) * global_batch))


def test_with_as_many_ranks_as_partitions_each_rank_reads_one_partition():
    order = EpochOrder(shards([50, 50]), OrderSpec(0, global_batch=8, partitions=2, window=10), epoch=0)
    for rank in range(2):
        concat = set()
        for step in range(order.steps):
            for micro in range(2):
                for q in micro_batch_positions(step, micro, rank, 2, 2, 2, 8):
                    shard, index = order.sample(q)
                    concat.add(order.starts[order.shards.index(shard)] + index)
        assert all(rank * order.partition_len <= c < (rank + 1) * order.partition_len for c in concat)


def test_global_batch_must_divide_into_partitions():
    with pytest.raises(ConfigError, match="multiple of the run's data partitions"):
        OrderSpec(0, global_batch=10, partitions=4, window=8)


def batches(digits_dir, workers: int, start_step: int = 0, world=1, rank=0, accum=1, repeats=1, partitions=1,
            resolution=None):
    from dist_train.data.resolve import resolve_shards

    shard_set = resolve_shards(str(digits_dir), "train", 10)
    cfg = DataConfig(num_workers=workers, image_size=8, channels=1, mean=[0.3], std=[0.3], augment="light")
    order = OrderSpec(0, 32, partitions, 100, repeats=repeats)
    spec = TrainStreamSpec(ShardSet(shard_set.shards, None), order, epoch=1, num_classes=10,
                           batch_size=32 // (world * accum), grad_accum_steps=accum, rank=rank, world_size=world,
                           start_step=start_step, resolution=resolution)
    return list(make_train_loader(spec, cfg))


def test_batches_do_not_depend_on_workers_and_resume_mid_epoch(digits_dir):
    reference = batches(digits_dir, workers=0)
    assert len(reference) == 1438 // 32
    for other in (batches(digits_dir, workers=3), [*reference[:5], *batches(digits_dir, workers=2, start_step=5)]):
        assert len(other) == len(reference)
        for (x, y), (x2, y2) in zip(reference, other, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)  # same samples, same augmentation


@pytest.mark.parametrize("workers", [0, 1])
def test_reading_batches_leaves_the_global_random_state_alone(digits_dir, workers):
    """The state a checkpoint restores (dropout draws from it) is the model's alone: a resumed
    run starts its loader once more than a run never stopped, and must not draw from it."""
    before = torch.get_rng_state()
    batches(digits_dir, workers=workers, start_step=40)
    assert torch.equal(torch.get_rng_state(), before)


def test_two_ranks_split_each_global_batch(digits_dir):
    whole = batches(digits_dir, workers=0)
    halves = [batches(digits_dir, workers=1, world=2, rank=r) for r in range(2)]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][step][1], halves[1][step][1]]), y)
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), x)


@pytest.mark.parametrize(
    ("world", "accum", "batch", "partitions", "repeats"),
    [(2, 2, 2, 2, 1), (1, 4, 2, 2, 1), (4, 1, 2, 2, 1), (2, 1, 4, 1, 1), (4, 1, 2, 2, 2), (4, 2, 1, 4, 2),
     (2, 2, 3, 2, 3), (8, 1, 2, 4, 2)]
)
def test_a_rank_reads_only_the_shards_it_is_told(world, accum, batch, partitions, repeats):
    spec = OrderSpec(1, world * accum * batch, partitions, 5, repeats=repeats)
    order = EpochOrder(shards([9, 14, 3, 20, 11, 17, 8]), spec, epoch=3)
    for rank in range(world):
        allowed = set(order.shards_for_rank(rank, world, accum, batch))
        for step in range(order.steps):
            for micro in range(accum):
                for q in micro_batch_positions(step, micro, rank, world, accum, batch, order.spec.global_batch):
                    assert order.sample(q)[0] in allowed
