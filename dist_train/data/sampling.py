"""Which training samples an epoch reads, and how often: `data.sampling`.

    uniform    every sample once per epoch (the default)
    balanced   every class equally often: a sample of class c has weight 1 / n_c
    sqrt       class c about sqrt(n_c) times as often as a class of one sample: weight 1 / sqrt(n_c)
    weights    a sample of class c has weight data.sampling_weights[c] (WeightedRandomSampler's
               per-sample weights, given per class)

A sampled epoch draws `data.samples_per_epoch` samples (default: the training set's size)
with replacement, stratified by class: class c gets its share of the draws, the epoch's
draws times its weight mass n_c w_c over the total (rounded by largest remainder, so the
shares are exact to one sample), and its samples are drawn uniformly with replacement within
it. That is WeightedRandomSampler's distribution with less variance: a balanced epoch of 736
reads every class 73 or 74 times, not 74 +- 8. The generator is seeded by (seed, epoch)
alone: every rank and every DataLoader worker draws the same multiset, whatever the number
of processes, and a resumed run draws what an uninterrupted one did. The draw only says how
many times each sample is read this epoch; data/order.py then lays those reads out exactly
as it lays out a uniform epoch (shards shuffled, partitions, shuffle windows), so sampled
epochs read shards just as sequentially, and W x K x b equivalence and exact resume hold.

Sampling needs each training sample's label: read once per process from the shards' `.cls`
members by offset (no image decoded), by the code that checks labels at indexing.
"""

from __future__ import annotations

import numpy as np

from dist_train.config import DataConfig
from dist_train.data.labels import LabelReader
from dist_train.data.resolve import shard_labels
from dist_train.data.shard_cache import ShardCache
from dist_train.data.shard_format import Shard, ShardSet
from dist_train.errors import DataError


def class_weights(mode: str, counts: np.ndarray, configured: list[float] | None = None) -> np.ndarray:
    """The weight of one sample of each class; a class without samples gets 0."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if mode == "balanced":
        weights[present] = 1.0 / counts[present]
    elif mode == "sqrt":
        weights[present] = 1.0 / np.sqrt(counts[present])
    elif mode == "weights":
        weights = np.asarray(configured, dtype=np.float64) * present
    else:
        raise ValueError(f"no class weights for data.sampling={mode}")
    return weights


class EpochSampler:
    """The training samples' labels (in the shards' order, concatenated) and each class's
    weight: what a sampled epoch's draw needs."""

    def __init__(self, labels: np.ndarray, per_class: np.ndarray):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.per_class = np.asarray(per_class, dtype=np.float64)
        self.counts = np.bincount(self.labels, minlength=len(self.per_class))
        mass = self.counts * self.per_class
        if not mass.sum() > 0:
            raise DataError("every training sample has weight 0 (data.sampling_weights gives weight only to "
                            "classes the training set lacks)")
        self.share = mass / mass.sum()
        # The samples of each class, grouped once: members of class c are by_class[first[c]:first[c + 1]].
        self.by_class = np.argsort(self.labels, kind="stable")
        self.first = np.concatenate([[0], np.cumsum(self.counts)])

    def __len__(self) -> int:
        return len(self.labels)

    def draw_counts(self, draws: int, seed_of_epoch: int) -> np.ndarray:
        """How many times each sample is read in the epoch whose seed is given: `draws` in all."""
        rng = np.random.default_rng(seed_of_epoch)
        exact = draws * self.share
        quota = np.floor(exact).astype(np.int64)
        # Largest remainder, ties to the lower class: the quotas add up to `draws` (a class of
        # no weight never gets one).
        remainder = np.where(self.share > 0, exact - quota, -1.0)
        quota[np.argsort(-remainder, kind="stable")[: draws - quota.sum()]] += 1
        chosen = [self.by_class[self.first[c] + rng.integers(0, self.counts[c], size=quota[c])]
                  for c in np.flatnonzero(quota)]
        return np.bincount(np.concatenate(chosen), minlength=len(self.labels))


def epoch_sampler(cfg: DataConfig, train: ShardSet, num_classes: int, cache: ShardCache | None = None
                  ) -> EpochSampler:
    """The sampler of data.sampling for this training set (labels read from its shards)."""
    labels = read_labels(train.shards, LabelReader(num_classes), cache)
    per_class = class_weights(cfg.sampling, np.bincount(labels, minlength=num_classes), cfg.sampling_weights)
    try:
        return EpochSampler(labels, per_class)
    except DataError as exc:
        raise DataError(f"data.sampling={cfg.sampling}: {exc}") from None


def read_labels(shards: tuple[Shard, ...], labels: LabelReader, cache: ShardCache | None = None) -> np.ndarray:
    """The label of every sample of these shards, in order, from their label members."""
    found: list[int] = []
    for shard in shards:
        if not shard.remote:
            read = shard_labels(shard, labels)
        elif cache is None:
            raise DataError(f"{shard.url}: a remote shard, and no shard cache to read its labels from")
        else:
            with cache.open_pinned(shard.as_remote_object()) as local:
                read = shard_labels(shard, labels, local.name)
        if len(read) != shard.samples:
            raise DataError(f"{shard.url}: {len(read)} samples, {shard.samples} when indexed (changed since?)")
        found.extend(read)
    return np.asarray(found, dtype=np.int64)
