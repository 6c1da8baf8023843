"""The streaming input pipeline: webdataset tar reading, seeded shuffle, decode, transforms, batches.

One `ShardStream` per epoch and split. Inside each DataLoader worker it asks `plan` which
slices of which shards are its own, then runs a webdataset pipeline over them. Batches are
formed inside the workers, so the loader is used with `batch_size=None`.

The loader is deliberately not passed through `accelerator.prepare()`: for an iterable
dataset accelerate would either broadcast rank 0's batches or make every rank read the whole
stream, both at odds with the per-rank plan. Batches are moved to the device by the loop.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_train.config import DataConfig
from dist_train.data import plan
from dist_train.data.index import ShardSet, parse_label
from dist_train.data.sources import IMAGE_EXTENSIONS
from dist_train.data.transforms import build_transform
from dist_train.errors import DataError


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to find and prepare its samples (picklable for workers)."""

    shards: ShardSet
    train: bool
    batch_size: int
    num_classes: int
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    grad_accum_steps: int = 1
    shuffle_buffer: int = 1000
    with_keys: bool = False  # also yield each sample's "url#key" (for predictions)


class ShardStream(IterableDataset):
    def __init__(self, spec: StreamSpec, transform: Callable, channels: int):
        self.spec = spec
        self.transform = transform
        self.mode = "L" if channels == 1 else "RGB"

    def slices(self, worker: int, num_workers: int) -> list[plan.Slice]:
        s = self.spec
        if s.train:
            return plan.train_slices(
                s.shards.shards, seed=s.seed, epoch=s.epoch, rank=s.rank, world_size=s.world_size,
                worker=worker, num_workers=num_workers, batch_size=s.batch_size,
                grad_accum_steps=s.grad_accum_steps,
            )
        return plan.val_slices(s.shards.shards, rank=s.rank, world_size=s.world_size,
                               worker=worker, num_workers=num_workers)

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        s = self.spec
        slices = self.slices(worker, num_workers)
        stages: list = [lambda: iter(slices), read_slices]
        if s.train:
            rng = random.Random(plan.derive_seed(s.seed, s.epoch, s.rank, worker))
            stages.append(wds.shuffle(s.shuffle_buffer, initial=s.shuffle_buffer, rng=rng))
        stages.append(wds.map(self.prepare))
        # Training slices hold whole batches; validation keeps the last, smaller batch.
        stages.append(wds.batched(s.batch_size, partial=not s.train, collation_fn=collate))
        return iter(wds.DataPipeline(*stages))

    def prepare(self, sample: dict) -> tuple:
        where = f"{sample['__url__']}: sample {sample['__key__']!r}"
        image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
        if image_key is None:
            raise DataError(f"{where} has no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        if "cls" not in sample:
            raise DataError(f"{where} has no .cls label")
        label = parse_label(sample["cls"], self.spec.num_classes, where)
        try:
            with Image.open(io.BytesIO(sample[image_key])) as img:
                image = img.convert(self.mode)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataError(f"{where}: .{image_key} is not a decodable image ({exc})") from None
        prepared = (self.transform(image), label)
        if self.spec.with_keys:
            prepared += (f"{sample['__url__']}#{sample['__key__']}",)
        return prepared


def read_slices(slices: Iterable[plan.Slice]) -> Iterator[dict]:
    """Samples of each slice, in shard order, read with webdataset's tar reader."""
    for piece in slices:
        samples = wds.tariterators.tarfile_samples([{"url": piece.url}])
        yielded = 0
        for sample in islice(samples, piece.start, piece.stop):
            yielded += 1
            yield sample
        samples.close()  # closes the shard file now rather than at garbage collection
        if yielded != piece.samples:
            raise DataError(
                f"{piece.url}: expected samples {piece.start}..{piece.stop - 1}, the shard "
                f"ended after {piece.start + yielded} (changed since it was indexed?)"
            )


def collate(samples: list[tuple]) -> tuple:
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    if len(samples[0]) == 3:
        return images, labels, [s[2] for s in samples]
    return images, labels


def make_loader(spec: StreamSpec, data_cfg: DataConfig, pin_memory: bool = False) -> DataLoader:
    stream = ShardStream(spec, build_transform(data_cfg, train=spec.train), data_cfg.channels)
    # Worker RNGs (random augmentations) derive from this generator: a function of the seed,
    # the epoch and the rank, never of the wall clock.
    generator = torch.Generator().manual_seed(plan.derive_seed(spec.seed, spec.epoch, spec.rank, 1))
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=data_cfg.num_workers,
        pin_memory=pin_memory,
        generator=generator,
        # Two batches in flight per worker: enough to hide decode jitter, little memory.
        prefetch_factor=2 if data_cfg.num_workers > 0 else None,
    )
