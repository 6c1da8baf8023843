"""Repeated augmentation (data.repeated_augment) on streaming shards: RASampler's semantics in
the project's order (data/order.py), a pure function of (seed, epoch, step)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch
from timm.data.distributed_sampler import RepeatAugSampler

from dist_train.data.order import EpochOrder, OrderSpec, micro_batch_positions
from dist_train.errors import ConfigError

from .test_order import batches, shards

DIGITS_TRAIN = 1438  # conftest's digits shards: the training split


def reads_of_step(order: EpochOrder, step: int, world: int, accum: int, batch: int) -> dict:
    """{sample: [(rank, micro-batch), ...]} of one optimizer step."""
    where = defaultdict(list)
    for rank in range(world):
        for micro in range(accum):
            for q in micro_batch_positions(step, micro, rank, world, accum, batch, order.spec.global_batch):
                where[order.sample(q)].append((rank, micro))
    return where


@pytest.mark.parametrize(("world", "accum", "batch", "repeats", "partitions"),
                         [(2, 2, 4, 2, 2), (1, 4, 4, 2, 1), (4, 1, 6, 3, 2), (3, 1, 6, 3, 3), (8, 1, 4, 4, 8),
                          (1, 3, 5, 3, 1), (8, 1, 16, 3, 8), (2, 1, 7, 3, 2)])
def test_each_selected_sample_is_read_k_times_in_k_micro_batches_of_one_step(world, accum, batch, repeats,
                                                                              partitions):
    spec = OrderSpec(seed=4, global_batch=world * accum * batch, partitions=partitions, window=7, repeats=repeats)
    order = EpochOrder(shards([37, 50, 23, 61, 18]), spec, epoch=1)
    distinct, fewer = spec.distinct_per_step, spec.distinct_per_step * repeats - spec.global_batch
    epoch_reads = Counter()
    for step in range(order.steps):
        where = reads_of_step(order, step, world, accum, batch)
        assert len(where) == distinct
        copies = sorted(len(places) for places in where.values())
        assert copies == [repeats - 1] * fewer + [repeats] * (distinct - fewer)
        for places in where.values():  # k copies (or k - 1 where k*D > G), all in this step
            if world * accum >= repeats:  # else fewer micro-batches than copies: some share one
                assert len(set(places)) == len(places)  # each in another micro-batch
            if world >= repeats:
                assert len({rank for rank, _ in places}) == len(places)  # on another process
        epoch_reads.update(Counter({sample: len(places) for sample, places in where.items()}))
    assert set(epoch_reads.values()) <= {repeats, repeats - 1}  # a sample of one step is in no other
    assert sum(epoch_reads.values()) == order.steps * spec.global_batch == 189 // spec.global_batch * spec.global_batch


@pytest.mark.parametrize(("samples", "repeats", "world", "global_batch"),
                         [(DIGITS_TRAIN, 2, 2, 64), (DIGITS_TRAIN, 3, 2, 96), (50_000, 3, 8, 1024),
                          (1_281_167, 3, 8, 1024), (1_281_167, 4, 16, 2048)])
def test_reads_and_distinct_samples_per_epoch_match_rasampler(samples, repeats, world, global_batch):
    """timm's RepeatAugSampler is DeiT's RASampler, as torchvision's references copy it: per rank
    floor(N // 256 * 256 / W) reads of the repeated, strided permutation."""
    ra = [RepeatAugSampler(range(samples), num_replicas=world, rank=r, num_repeats=repeats) for r in range(world)]
    for sampler in ra:
        sampler.set_epoch(1)
    ra_reads = [i for sampler in ra for i in sampler]
    ra_distinct = len(set(ra_reads))

    spec = OrderSpec(seed=0, global_batch=global_batch, partitions=world, window=1000, repeats=repeats)
    order = EpochOrder(shards([samples]), spec, epoch=1)
    ours_reads = order.steps * global_batch
    ours_distinct = order.steps * spec.distinct_per_step
    print(f"N={samples} k={repeats} W={world}: reads {ours_reads} (RASampler {len(ra_reads)}), "
          f"distinct {ours_distinct} (RASampler {ra_distinct})")
    # Each rounds an epoch down: RASampler to 256 samples, the order to whole global batches.
    assert abs(ours_reads - len(ra_reads)) < max(256, global_batch)
    # D rounds G/k up to a multiple of the partitions: up to C - 1 more distinct samples a step.
    rounded_up = order.steps * (spec.distinct_per_step - global_batch / repeats)
    assert abs(ours_distinct - ra_distinct) <= max(256, global_batch) // repeats + 1 + rounded_up
    if samples < 100_000:  # every read counted, not only the sizes
        distinct = {order.sample(q) for q in range(ours_reads)}
        assert len(distinct) == ours_distinct


def test_the_global_batch_must_hold_k_copies_on_every_partition():
    with pytest.raises(ConfigError, match=r"cannot hold data\.repeated_augment=3 copies"):
        OrderSpec(0, global_batch=8, partitions=4, window=8, repeats=3)  # D = 4: 2 x 4 >= 8


@pytest.mark.slow
def test_one_process_reads_the_global_batches_of_two_ranks_and_resumes_mid_epoch(digits_dir):
    """Real shards, decoded and augmented: 1 process x 4 micro-batches of 8 takes, step by step,
    the images and labels 2 ranks x 2 micro-batches take; copies are augmented apart; a loader
    started at step 9 reads what the whole epoch's did from there."""
    whole = batches(digits_dir, workers=1, accum=4, repeats=2, partitions=2)
    ranks = [batches(digits_dir, workers=2, world=2, rank=r, accum=2, repeats=2, partitions=2) for r in range(2)]
    steps = DIGITS_TRAIN // 32
    assert len(whole) == 4 * steps and all(len(r) == 2 * steps for r in ranks)
    for step in range(steps):
        x1 = torch.cat([whole[4 * step + m][0] for m in range(4)])
        y1 = torch.cat([whole[4 * step + m][1] for m in range(4)])
        x2 = torch.cat([ranks[r][2 * step + m][0] for r in range(2) for m in range(2)])
        y2 = torch.cat([ranks[r][2 * step + m][1] for r in range(2) for m in range(2)])
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(y1[:16], y1[16:])  # copy j of sample i at j * G/k + i
        assert not torch.equal(x1[:16], x1[16:])  # each copy augmented on its own
    restarted = batches(digits_dir, workers=2, start_step=9, accum=4, repeats=2, partitions=2)
    for (x, y), (x2, y2) in zip(whole[4 * 9:], restarted, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
