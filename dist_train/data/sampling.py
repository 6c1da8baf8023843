"""Which training samples an epoch reads, and how often: `data.sampling`.

    uniform    every sample once per epoch (the default)
    balanced   every class equally often: a sample of class c has weight 1 / n_c
    sqrt       class c about sqrt(n_c) times as often as a class of one sample: weight 1 / sqrt(n_c)
    weights    a sample of class c has weight data.sampling_weights[c] (WeightedRandomSampler's
               per-sample weights, given per class)

A sampled epoch draws `data.samples_per_epoch` samples (default: the training set's size)
with replacement, in proportion to their weights, from a generator seeded by (seed, epoch)
alone: every rank and every DataLoader worker draws the same multiset, whatever the number
of processes, and a resumed run draws what an uninterrupted one did. The draw only says how
many times each sample is read this epoch; data/order.py then lays those reads out exactly
as it lays out a uniform epoch (shards shuffled, partitions, shuffle windows), so sampled
epochs read shards just as sequentially, and W x K x b equivalence and exact resume hold.

Sampling needs each training sample's label: read once per process from the shards' `.cls`
members by offset (no image decoded).
"""

from __future__ import annotations

import numpy as np

from dist_train.config import DataConfig
from dist_train.data.labels import LabelReader
from dist_train.data.resolve import Shard, ShardSet, usable_index
from dist_train.data.shard_cache import ShardCache
from dist_train.errors import DataError

DRAW_STREAM = 11  # keeps the draw's generator apart from the other seeds derived from (seed, epoch)


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


def sample_weights(cfg: DataConfig, train: ShardSet, num_classes: int, cache: ShardCache | None = None) -> np.ndarray:
    """Each training sample's weight, in the shards' order (concatenated): what the draw uses."""
    labels = read_labels(train.shards, LabelReader(num_classes), cache)
    per_class = class_weights(cfg.sampling, np.bincount(labels, minlength=num_classes), cfg.sampling_weights)
    weights = per_class[labels]
    if not weights.sum() > 0:
        raise DataError(f"data.sampling={cfg.sampling}: every training sample has weight 0 (data.sampling_weights "
                        "gives weight only to classes the training set lacks)")
    return weights


def draw_counts(weights: np.ndarray, draws: int, seed_of_epoch: int) -> np.ndarray:
    """How many times each sample is read in the epoch whose seed is given: `draws` in all."""
    rng = np.random.default_rng(seed_of_epoch)
    chosen = rng.choice(len(weights), size=draws, replace=True, p=weights / weights.sum())
    return np.bincount(chosen, minlength=len(weights))


def read_labels(shards: tuple[Shard, ...], labels: LabelReader, cache: ShardCache | None = None) -> np.ndarray:
    """The label of every sample of these shards, in order, from their `.cls` members."""
    found: list[int] = []
    for shard in shards:
        if shard.remote:
            if cache is None:
                raise DataError(f"{shard.url}: a remote shard, and no shard cache to read its labels from")
            with cache.open_pinned(shard.as_remote_object()) as local:
                found.extend(_shard_labels(shard, labels, local.name))
        else:
            found.extend(_shard_labels(shard, labels, shard.url))
    return np.asarray(found, dtype=np.int64)


def _shard_labels(shard: Shard, labels: LabelReader, path: str) -> list[int]:
    index = usable_index(shard, path if shard.remote else "")
    found = []
    with open(path, "rb") as f:
        for key, members in index:
            where = f"{shard.url}: sample {key!r}"
            if "cls" not in members:
                raise DataError(f"{where} {labels.missing()}")
            offset, size = members["cls"]
            f.seek(offset)
            found.append(labels.read(f.read(min(size, 64)), "cls", where))
    if len(found) != shard.samples:
        raise DataError(f"{shard.url}: {len(found)} samples, {shard.samples} when indexed (changed since?)")
    return found
