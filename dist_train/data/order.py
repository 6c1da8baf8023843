"""The training sample order: a pure function of (seed, epoch, global position).

Every training sample of an epoch has a global position q. Optimizer step s consumes
positions [s*G, (s+1)*G), where G is the global batch (processes x accumulation x per-process
batch). The order does not depend on the number of processes, of accumulation steps or of
DataLoader workers, so a run can stop at any step and resume, on another number of
processes, exactly where it stopped: the state of the data is just (epoch, step).

How positions map to samples (the design of MosaicML Streaming, on webdataset tar shards):
  1. Shards are shuffled per epoch and read as one sequence of N samples.
  2. The sequence is cut into C contiguous *partitions*, C fixed for the whole run (the
     number of processes of its first launch), each holding steps * G / C samples; the rest
     (fewer than G) is skipped this epoch, different samples each epoch.
  3. Within a partition, samples are shuffled inside windows of B consecutive samples
     (`data.shuffle_buffer`), each window with its own seeded permutation.
  4. A global batch takes G / C consecutive samples of every partition, partition 0 first.
With as many processes as partitions, each process reads only its own partition, window by
window; with fewer, a process reads several; with more, they share one.

A sampled epoch (data.sampling, data/sampling.py) first draws how many times each sample is
read; the sequence of step 1 then holds each shard's drawn samples (a sample drawn twice,
twice) in place of all its samples, and steps 2-4 are the same.

Repeated augmentation (data.repeated_augment = k, DeiT's RASampler on streaming shards): a
global batch holds D = G/k distinct samples (rounded up to a multiple of C), each k times,
copy j of the i-th at offset j*D + i; where k*D exceeds G, the step's last k*D - G samples
are read k - 1 times, as RASampler's last samples of a rank are. Copies are D positions
apart, at least a micro-batch (b <= D when W*K >= k): each falls in another micro-batch of
the step, and with W >= k on another process, as RASampler spreads them over GPUs. Steps 2-4
lay out the distinct samples with D in place of G, over the first steps*D samples of the
sequence: an epoch still reads about N samples (its steps are N // G), N/k of them distinct,
which ones changing with each epoch's shard order. Each copy is augmented from its own
position's seed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from dist_train.data.shard_format import Shard
from dist_train.errors import ConfigError
from dist_train.runtime.seeds import derive_seed  # the order's seeds, and mixing's and augmentation's

if TYPE_CHECKING:
    from dist_train.data.sampling import EpochSampler

DRAW_STREAM = 11  # keeps a sampled epoch's draw apart from the other seeds derived from (seed, epoch)


@dataclass(frozen=True)
class OrderSpec:
    """What fixes the order; saved in resumable checkpoints and kept across resumes."""

    seed: int
    global_batch: int  # G: samples per optimizer step, over all processes
    partitions: int  # C: divides G
    window: int  # B: shuffle window within a partition
    sampling: str = "uniform"  # data.sampling; other than uniform, the epoch is drawn
    samples_per_epoch: int = 0  # a drawn epoch's samples (0: as many as the training set has)
    repeats: int = 1  # data.repeated_augment: k copies of each sample a step reads

    def __post_init__(self):
        if self.global_batch % self.partitions:
            raise ConfigError(
                f"the global batch ({self.global_batch}) must be a multiple of the run's data partitions "
                f"({self.partitions}, its first launch's process count)"
            )
        if (self.repeats - 1) * self.distinct_per_step >= self.global_batch:
            raise ConfigError(
                f"a global batch of {self.global_batch} cannot hold data.repeated_augment={self.repeats} copies "
                f"of samples spread over {self.partitions} data partitions: use a larger batch or fewer repeats")

    @property
    def distinct_per_step(self) -> int:
        """D, the distinct samples of a global batch: G / k, rounded up to a multiple of C."""
        return -(-self.global_batch // (self.repeats * self.partitions)) * self.partitions


class EpochOrder:
    """`sampler`: for a sampled epoch (spec.sampling), what draws it (data/sampling.py)."""

    def __init__(self, shards: tuple[Shard, ...], spec: OrderSpec, epoch: int, sampler: EpochSampler | None = None):
        self.spec = spec
        self.epoch = epoch
        shard_order = np.random.default_rng(derive_seed(spec.seed, epoch)).permutation(len(shards))
        self.shards = [shards[i] for i in shard_order]
        self.drawn: np.ndarray | None = None  # sampled: the index within its shard of each read
        reads = [s.samples for s in self.shards]  # per shard, in the epoch's order
        if spec.sampling != "uniform":
            reads = self._draw(shards, shard_order, sampler)
        self.starts = np.cumsum([0, *reads]).tolist()
        total = self.starts[-1]
        self.steps = steps_per_epoch(total, spec.global_batch)
        self.per_partition_step = spec.distinct_per_step // spec.partitions  # D / C
        self.partition_len = self.steps * self.per_partition_step

    def sample(self, position: int) -> tuple[Shard, int]:
        """(shard, index within the shard) of the sample at this global position."""
        step, offset = divmod(position, self.spec.global_batch)
        offset %= self.spec.distinct_per_step  # its copy's number does not matter here
        partition, within = divmod(offset, self.per_partition_step)
        p = step * self.per_partition_step + within  # position inside the partition
        window, slot = divmod(p, self.spec.window)
        source = window * self.spec.window + int(self._window_perm(partition, window)[slot])
        concat = partition * self.partition_len + source
        shard = bisect.bisect_right(self.starts, concat) - 1
        if self.drawn is not None:
            return self.shards[shard], int(self.drawn[concat])
        return self.shards[shard], concat - self.starts[shard]

    def _draw(self, shards: tuple[Shard, ...], shard_order: np.ndarray, sampler: EpochSampler | None) -> list[int]:
        """Draw the epoch's samples (data/sampling.py); keep the shards with a sample drawn, in
        the epoch's shard order, and the index of each read within its shard. Returns the
        reads per kept shard."""
        total = sum(s.samples for s in shards)
        if sampler is None or len(sampler) != total:
            raise ValueError(f"data.sampling={self.spec.sampling} needs the label of every training sample")
        counts = sampler.draw_counts(self.spec.samples_per_epoch or total,
                                     derive_seed(self.spec.seed, self.epoch, DRAW_STREAM))
        firsts = np.cumsum([0] + [s.samples for s in shards])
        kept, drawn, reads = [], [], []
        for i in shard_order:
            times = counts[firsts[i]:firsts[i + 1]]
            if times.any():
                kept.append(shards[i])
                drawn.append(np.repeat(np.arange(len(times), dtype=np.int64), times))
                reads.append(int(times.sum()))
        self.shards, self.drawn = kept, np.concatenate(drawn)
        return reads

    def partitions_of(self, rank: int, chunk: int) -> range:
        """The partitions rank `rank`'s run of `chunk` positions of every global batch reads: a
        range (with repeats, a run of offsets taken modulo D, which wraps to all of them)."""
        distinct, per = self.spec.distinct_per_step, self.per_partition_step
        start = rank * chunk % distinct
        if chunk >= distinct or start + chunk > distinct:
            return range(self.spec.partitions)
        return range(start // per, (start + chunk - 1) // per + 1)

    def shards_for_rank(self, rank: int, world_size: int, grad_accum_steps: int, batch_size: int) -> list[Shard]:
        """The shards a rank reads this epoch: those overlapping its partitions."""
        partitions = self.partitions_of(rank, grad_accum_steps * batch_size)  # its run of every global batch
        lo, hi = partitions.start * self.partition_len, partitions.stop * self.partition_len
        return [s for s, start, stop in zip(self.shards, self.starts, self.starts[1:], strict=False)
                if start < hi and stop > lo]

    def _window_perm(self, partition: int, window: int) -> np.ndarray:
        return _permutation(self.spec.seed, self.epoch, partition, window,
                            min(self.spec.window, self.partition_len - window * self.spec.window))


@lru_cache(maxsize=64)
def _permutation(seed: int, epoch: int, partition: int, window: int, size: int) -> np.ndarray:
    return np.random.default_rng(derive_seed(seed, epoch, partition, window, 7)).permutation(size)


def steps_per_epoch(total_samples: int, global_batch: int) -> int:
    return total_samples // global_batch


def micro_batch_positions(step: int, micro: int, rank: int, world_size: int, grad_accum_steps: int,
                          batch_size: int, global_batch: int) -> range:
    """Global positions of rank `rank`'s micro-batch `micro` (0..K-1) of optimizer step `step`.

    Within a global batch, rank r takes the r-th run of K*b positions, so with as many ranks as
    partitions every rank stays inside its own partition.
    """
    start = step * global_batch + (rank * grad_accum_steps + micro) * batch_size
    return range(start, start + batch_size)
