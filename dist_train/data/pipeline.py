"""The input pipeline: tar shards -> decoded, transformed images -> batches, per rank and worker.

Training (`TrainStream`) reads samples in the order of data/order.py, each directly from its
shard by its byte span in the node's index (data/random_access.py, data/sample_index.py): a
function of (seed, epoch, position), resumable at any step.
Evaluation and prediction (`EvalStream`) stream each rank's share of the shards once, in
order, through webdataset's tar reader (data/eval_split.py says which share). Batches are formed
inside the DataLoader workers, so loaders use `batch_size=None`; a batch is turned into
normalized float32 there too, once per batch (data/transforms.py), except for a CUDA device:
there batches stay uint8 (a quarter of the bytes over PCIe) and the GPU normalizes them
(`device_stage`); with data.decode_on_device they leave the workers as JPEG bytes, decoded
and augmented on the device (data/device_decode.py).

The loader is deliberately not passed through `accelerator.prepare()`: for an iterable
dataset accelerate would either broadcast rank 0's batches or make every rank read the whole
stream, both at odds with the per-rank plan. Batches are moved to the device by the loop.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from dist_train.config import DataConfig
from dist_train.data import eval_split, workers
from dist_train.data.device_decode import DeviceStage, EncodedImages, encoded_jpeg
from dist_train.data.labels import label_reader
from dist_train.data.order import EpochOrder, OrderSpec, micro_batch_positions
from dist_train.data.prefetch import NodePlan, Prefetcher, check_room, steps_in_flight
from dist_train.data.random_access import ShardReader
from dist_train.data.resolution import ResolutionSchedule
from dist_train.data.sample_index import node_index
from dist_train.data.sampling import EpochSampler
from dist_train.data.shard_cache import ShardCache, cache_for, evicted_last
from dist_train.data.shard_format import IMAGE_EXTENSIONS, IMAGE_FORMATS, Shard, ShardSet
from dist_train.data.transforms import build_batch_normalize, build_transform
from dist_train.errors import DataError
from dist_train.runtime.seeds import derive_seed

PREFETCH_SPANS = 4  # the prefetcher fetches this many times the steps in flight ahead
MAX_REPLACEMENTS = 16  # damaged training samples in a row replaced before giving up
# `decode_image` refuses an image above data.max_image_pixels itself: PIL's warning is noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class EvalStreamSpec:
    """A read of every sample once (validation, evaluation, prediction), this rank's share."""

    shards: ShardSet
    batch_size: int
    num_classes: int
    rank: int = 0
    world_size: int = 1
    with_keys: bool = False  # also yield each sample's "url#key" (for predictions)
    # Remote shards another reader needs (validation during training: the training set's), whose
    # cached copies this read evicts last, so that it does not undo the training prefetch.
    keep_cached: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainStreamSpec:
    """This rank's training batches of one epoch, from `start_step` on (see data/order.py)."""

    shards: ShardSet
    order: OrderSpec
    epoch: int
    num_classes: int
    batch_size: int  # per process, per micro-step
    grad_accum_steps: int = 1
    rank: int = 0
    world_size: int = 1
    start_step: int = 0
    local_world_size: int = 1  # processes on this node (ranks node*L .. node*L+L-1): they share a shard cache
    epochs: int = 0  # of the run (0: unknown); remote shards of the next epoch are fetched ahead
    # data.sampling other than uniform: what draws each epoch (data/sampling.py)
    sampler: EpochSampler | None = field(default=None, compare=False, repr=False)
    resolution: ResolutionSchedule | None = None  # progressive resizing: the crop size of each step

    def crop_size(self, order: EpochOrder, step: int) -> int | None:
        """The training crop of step `step` of the order's epoch (None: data.image_size)."""
        return self.resolution.size_at(order.epoch, step, order.steps) if self.resolution else None

    @property
    def node_ranks(self) -> range:
        first = self.rank - self.rank % self.local_world_size
        return range(first, min(first + self.local_world_size, self.world_size))

    def epoch_order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self.shards.shards, self.order, epoch, self.sampler)

    def node_plan(self, order: EpochOrder, cache: ShardCache) -> NodePlan:
        """What the node reads when this epoch, and the next epoch chained on if there is one."""
        plan = NodePlan(order, self.node_ranks, self.grad_accum_steps, self.batch_size, cache)
        if order.epoch + 1 < self.epochs:
            next_order = self.epoch_order(order.epoch + 1)
            plan.then_follow(NodePlan(next_order, self.node_ranks, self.grad_accum_steps, self.batch_size, cache))
        return plan


class SampleDecoder:
    """A raw sample (dict of member bytes) -> (uint8 image tensor, label[, source]), or a
    DataError that names the shard and the sample key. `collate` makes a batch of them."""

    def __init__(self, data_cfg: DataConfig, train: bool, num_classes: int, with_keys: bool = False,
                 for_device_stage: bool = False):
        self.transform = build_transform(data_cfg, train=train)
        self.data_cfg, self.train = data_cfg, train
        self.sized_transforms: dict[int, v2.Compose] = {}  # progressive resizing: one per crop size
        # for_device_stage: the device finishes the batches (`device_stage`): the images stay uint8,
        # or (data.decode_on_device) JPEG bytes and their transforms' seed
        self.encoded = for_device_stage and data_cfg.decode_on_device
        self.collate = Collate(data_cfg, normalize=not for_device_stage, encoded_for=train if self.encoded else None)
        self.mode = "L" if data_cfg.channels == 1 else "RGB"
        self.num_classes = num_classes
        self.labels = label_reader(data_cfg, num_classes)
        self.with_keys = with_keys
        self.skip_damaged = data_cfg.on_error == "skip"
        self.max_skipped = data_cfg.max_skipped
        self.max_pixels = data_cfg.max_image_pixels

    def transform_for(self, size: int | None):
        if size is None:
            return self.transform
        if size not in self.sized_transforms:
            self.sized_transforms[size] = build_transform(self.data_cfg, train=self.train, size=size)
        return self.sized_transforms[size]

    def __call__(self, sample: dict, size: int | None = None) -> tuple:
        """`size`: the training crop of this sample's step (progressive resizing)."""
        where = f"{sample['__url__']}: sample {sample['__key__']!r}"
        image_key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
        if image_key is None:
            raise DataError(f"{where} has no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        member = self.labels.member(sample)
        if member is None:
            raise DataError(f"{where} {self.labels.missing()}")
        label = self.labels.read(sample[member], member, where)
        if self.encoded:
            # The seed TrainStream set for this sample: the device draws its transforms from it.
            image = (encoded_jpeg(sample[image_key], self.max_pixels, f"{where}: .{image_key}"),
                     torch.default_generator.initial_seed())
            prepared = (image, self.labels.target(label))
        else:
            image = decode_image(io.BytesIO(sample[image_key]), self.mode, self.max_pixels, f"{where}: .{image_key}")
            prepared = (self.transform_for(size)(image), self.labels.target(label))
        if self.with_keys:
            prepared += (f"{sample['__url__']}#{sample['__key__']}",)
        return prepared


# 16-bit grayscale (PNG "I;16", and "I" from some writers) spans 0..65535; PIL's convert("L")
# clips it at 255, which would make most 16-bit images white.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def decode_image(source, mode: str, max_pixels: int, where: str) -> Image.Image:
    """An image file (a path or a file object) decoded and converted to `mode`, or a DataError
    naming it: not a JPEG, PNG or WebP image, damaged, or a decompression bomb (more than
    `max_pixels` declared, or a compressed text chunk that expands past PIL's limit)."""
    # PIL's own limit is process-wide: make it the run's. It refuses at open what declares
    # more than twice as many pixels; the check below refuses the rest, before decoding.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():  # PIL warns between its limit and twice it: refused below, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source, formats=IMAGE_FORMATS)
        with img:
            width, height = img.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise DataError(f"{where}: {width} x {height} pixels, more than data.max_image_pixels={max_pixels}")
            if img.mode in SIXTEEN_BIT_MODES:
                return _eight_bit(img).convert(mode)
            return img.convert(mode)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{where}: {exc} (data.max_image_pixels={max_pixels})") from None
    except UnidentifiedImageError:
        raise DataError(f"{where} is not a decodable image (not a JPEG, PNG or WebP file)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{where} is not a decodable image ({' '.join(str(exc).split())[:200]})") from None


def _eight_bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (65535 -> 255, rounded), as 8-bit images are read."""
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")


class SkipCounter:
    """Samples this process skipped while reading (data.on_error=skip), shared with its
    DataLoader workers. Past data.max_skipped the run stops: damage that widespread is a
    broken dataset, not a few bad files."""

    def __init__(self, decode: SampleDecoder):
        self.decode = decode
        self.value = workers.context().Value("q", 0)

    def skip_or_raise(self, error: DataError) -> None:
        if not self.decode.skip_damaged:
            raise error
        with self.value.get_lock():
            self.value.value += 1
            count = self.value.value
        if count > self.decode.max_skipped:
            raise DataError(f"more than data.max_skipped={self.decode.max_skipped} damaged samples "
                            f"read by this process; the last: {error}")

    def take(self) -> int:
        """The count so far, and start again from zero."""
        with self.value.get_lock():
            count, self.value.value = self.value.value, 0
        return count


class EvalStream(IterableDataset):
    """Streams this rank's share of the shards with webdataset's tar reader, in order."""

    def __init__(self, spec: EvalStreamSpec, decode: SampleDecoder, cache: ShardCache | None = None):
        self.spec = spec
        self.decode = decode
        self.cache = cache
        self.skipped = SkipCounter(decode)

    def __iter__(self) -> Iterator:
        worker, num_workers = _this_worker()
        s = self.spec
        slices = eval_split.val_slices(s.shards.shards, rank=s.rank, world_size=s.world_size,
                                 worker=worker, num_workers=num_workers)
        damaged = {shard.url: shard for shard in s.shards.shards if shard.damaged}
        return iter(wds.DataPipeline(
            lambda: iter(slices),
            lambda pieces: read_slices(pieces, damaged, self.cache, s.keep_cached),
            self._decoded,
            wds.batched(s.batch_size, partial=True, collation_fn=self.decode.collate),
        ))

    def _decoded(self, samples: Iterable[dict]) -> Iterator[tuple]:
        for sample in samples:
            try:
                yield self.decode(sample)
            except DataError as exc:  # evaluated without it (data.on_error=skip), and counted
                self.skipped.skip_or_raise(exc)


class TrainStream(IterableDataset):
    """This rank's training micro-batches, in the order data/order.py defines.

    Worker w of n builds micro-batches w, w+n, ... (the DataLoader takes them round-robin, so
    the batches arrive in order whatever n is). Each sample is read directly from its shard
    and augmented with a random state seeded by its global position: the batches are the same
    for any number of workers, and after a resume.
    """

    def __init__(self, spec: TrainStreamSpec, decode: SampleDecoder, cache: ShardCache | None = None,
                 lag_steps: int = 0):
        self.spec = spec
        self.decode = decode
        self.cache = cache  # for remote shards
        self.lag_steps = lag_steps  # copies read this many steps before a reader's are kept
        # (epoch, start step), shared with worker processes that outlive an epoch.
        self.position = workers.context().Array("q", [spec.epoch, spec.start_step])
        self.skipped = SkipCounter(decode)
        # Where every sample of the local shards lies: built once per node, mapped by every
        # process and worker of the node (a path when pickled to a worker).
        self.index = node_index(spec.shards.shards)

    def __iter__(self) -> Iterator:
        worker, num_workers = _this_worker()
        s = replace(self.spec, epoch=self.position[0], start_step=self.position[1])
        order = s.epoch_order(s.epoch)
        node_plan = s.node_plan(order, self.cache) if self.cache is not None else None
        reader = ShardReader(self.cache, index=self.index)
        try:
            micro_batches = range(s.start_step * s.grad_accum_steps, order.steps * s.grad_accum_steps)
            for j in micro_batches[worker::num_workers]:
                step, micro = divmod(j, s.grad_accum_steps)
                if node_plan is not None:
                    reader.now, reader.next_use = step, node_plan.next_use_by_name(step, self.lag_steps)
                positions = micro_batch_positions(step, micro, s.rank, s.world_size, s.grad_accum_steps,
                                                  s.batch_size, s.order.global_batch)
                size = s.crop_size(order, step)
                batch = self.decode.collate([self._prepare(order, reader, q, size) for q in positions])
                reader.release()  # remote copies this batch read may be evicted when done with
                yield batch
        finally:
            reader.close()

    def _prepare(self, order: EpochOrder, reader: ShardReader, position: int, size: int | None = None) -> tuple:
        shard, index = order.sample(position)
        # A sample that does not decode (data.on_error=skip) is replaced by the shard's next
        # one: every batch keeps its size, so all ranks still run the same number of steps.
        tries = min(shard.samples, MAX_REPLACEMENTS)
        for attempt in range(tries):
            raw = reader.sample(shard, (index + attempt) % shard.samples)
            # Random transforms draw from torch's CPU generator: seed it for this sample, and
            # put its state back (in the main process it also serves the model).
            # torch.manual_seed would cost far more: it seeds CUDA too.
            saved = torch.get_rng_state()
            torch.default_generator.manual_seed(derive_seed(self.spec.order.seed, order.epoch, position))
            try:
                return self.decode(raw, size)
            except DataError as exc:
                self.skipped.skip_or_raise(exc)
            finally:
                torch.set_rng_state(saved)
        raise DataError(f"{shard.url}: {tries} samples in a row from sample {index} on do not decode")


def _this_worker() -> tuple[int, int]:
    """(worker id, number of workers) inside a DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def read_slices(slices: Iterable[eval_split.Slice], damaged: dict[str, Shard] | None = None,
                cache: ShardCache | None = None, keep_cached: tuple[str, ...] = ()) -> Iterator[dict]:
    """Samples of each slice, in shard order, read with webdataset's tar reader; a shard with
    samples left out (data.on_error=skip) is read through its filtered index instead, and a
    remote shard from its copy in `cache`, pinned while it is read."""
    next_use = evicted_last(cache, keep_cached) if cache is not None else None
    for piece in slices:
        if damaged and piece.url in damaged:
            reader = ShardReader()
            yield from (reader.sample(damaged[piece.url], i) for i in range(piece.start, piece.stop))
            reader.close()
            continue
        if piece.remote:
            if cache is None:
                raise DataError(f"{piece.url}: a remote shard, and this reader has no shard cache")
            stream = cache.open_pinned(piece.shard.as_remote_object(), next_use)
        else:
            stream = open(piece.url, "rb")  # noqa: SIM115 - closed below, or by the generator's close
        # `url` names the shard in errors and in sample sources (predictions): the URL, not the copy.
        members = wds.tariterators.tar_file_expander([{"url": piece.url, "stream": stream}])
        samples = wds.tariterators.group_by_keys(members)
        yielded = 0
        try:
            for sample in islice(samples, piece.start, piece.stop):
                yielded += 1
                yield sample
        finally:
            samples.close()
            stream.close()  # the shard file now rather than at garbage collection; unpins a copy
        if yielded != piece.samples:
            raise DataError(
                f"{piece.url}: expected samples {piece.start}..{piece.stop - 1}, the shard "
                f"ended after {piece.start + yielded} (changed since it was indexed?)"
            )


class Collate:
    """Samples (uint8 image, label[, source]) -> (float32 images, labels[, sources]): int64 class
    indexes, or (multilabel) float32 multi-hot rows. With `normalize=False` the images stay
    uint8, for the device to normalize (`device_stage`)."""

    def __init__(self, data_cfg: DataConfig, normalize: bool = True, encoded_for: bool | None = None):
        self.normalize = build_batch_normalize(data_cfg) if normalize else None
        self.multilabel = data_cfg.task == "multilabel"
        self.encoded_for = encoded_for  # encoded images of training (True) or evaluation samples

    def __call__(self, samples: list[tuple]) -> tuple:
        if self.encoded_for is not None:
            images = EncodedImages([s[0][0] for s in samples], [s[0][1] for s in samples], self.encoded_for)
        else:
            images = torch.stack([s[0] for s in samples])
        if self.normalize is not None:
            images = self.normalize(images)
        if self.multilabel:
            labels = torch.stack([s[1] for s in samples])
        else:
            labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
        if len(samples[0]) == 3:
            return images, labels, [s[2] for s in samples]
        return images, labels


def make_eval_loader(spec: EvalStreamSpec, data_cfg: DataConfig, pin_memory: bool = False,
                     for_device_stage: bool = False) -> DataLoader:
    """Every sample of this rank's share once, in batches (the last may be smaller). `pin_memory`:
    batches in page-locked memory (for CUDA); `for_device_stage`: batches for a `device_stage` to
    finish: images not normalized, and with data.decode_on_device not decoded either."""
    decode = SampleDecoder(data_cfg, train=False, num_classes=spec.num_classes, with_keys=spec.with_keys,
                           for_device_stage=for_device_stage)
    cache = cache_for(data_cfg) if any(shard.remote for shard in spec.shards.shards) else None
    return _loader(EvalStream(spec, decode, cache), data_cfg, pin_memory)


class TrainLoader:
    """The training batches of a run, epoch after epoch, from persistent DataLoader workers.

        loader = make_train_loader(spec, data_cfg)
        loader.set_position(epoch, start_step)
        for images, labels in loader: ...
    """

    def __init__(self, spec: TrainStreamSpec, data_cfg: DataConfig, pin_memory: bool = False,
                 for_device_stage: bool = False):
        remote_shards = any(shard.remote for shard in spec.shards.shards)
        cache = cache_for(data_cfg) if remote_shards else None
        decode = SampleDecoder(data_cfg, train=True, num_classes=spec.num_classes, for_device_stage=for_device_stage)
        self.stream = TrainStream(spec, decode, cache, lag_steps=steps_in_flight(data_cfg.num_workers,
                                                                                 spec.grad_accum_steps))
        # Workers live across epochs (no start-up cost per epoch).
        self.loader = _loader(self.stream, data_cfg, pin_memory, persistent=True)
        # The node's first process fetches remote shards ahead of its ranks' reads.
        self.prefetcher = (Prefetcher(cache, horizon=PREFETCH_SPANS * self.stream.lag_steps)
                           if cache and spec.rank == spec.node_ranks.start else None)
        self.set_position(spec.epoch, spec.start_step)

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        s = self.stream.spec
        self.stream.position[0], self.stream.position[1] = epoch, start_step
        order = s.epoch_order(epoch)
        if self.stream.cache is not None:
            node_plan = s.node_plan(order, self.stream.cache)
            # The cache must hold the shards of the steps read at once: checked per epoch,
            # before any worker waits for room.
            check_room(node_plan, self.stream.cache, self.stream.lag_steps)
            if self.prefetcher:
                self.prefetcher.follow(node_plan, start_step)

    def __iter__(self) -> Iterator:
        if self.prefetcher is None:
            return iter(self.loader)
        return self._telling_prefetcher(iter(self.loader))

    def _telling_prefetcher(self, batches: Iterator) -> Iterator:
        """The batches, telling the prefetcher which step the run has reached."""
        first_step, per_step = self.stream.position[1], self.stream.spec.grad_accum_steps
        for j, batch in enumerate(batches):
            self.prefetcher.reached(first_step + j // per_step)
            yield batch


def make_train_loader(spec: TrainStreamSpec, data_cfg: DataConfig, pin_memory: bool = False,
                      for_device_stage: bool = False) -> TrainLoader:
    """This rank's training micro-batches, from `spec.epoch` and `spec.start_step` on
    (`pin_memory`, `for_device_stage`: as for `make_eval_loader`)."""
    return TrainLoader(spec, data_cfg, pin_memory, for_device_stage)


def _loader(dataset: IterableDataset, data_cfg: DataConfig, pin_memory: bool, persistent: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # batches are formed in the workers
        pin_memory=pin_memory,
        persistent_workers=persistent and data_cfg.num_workers > 0,
        # Two batches in flight per worker: enough to hide decode jitter, little memory.
        prefetch_factor=2 if data_cfg.num_workers > 0 else None,
        # Its own generator for the workers' base seed: by default each iter() draws it from the
        # global random state, which a checkpoint restores and dropout or stochastic depth use,
        # so a resumed run would draw once more than one never stopped. Samples are seeded by
        # their position (TrainStream), not by the worker.
        generator=torch.Generator().manual_seed(0),
        **workers.loader_options(data_cfg.num_workers),
    )


def device_stage(data_cfg: DataConfig, device: torch.device):
    """What the loop finishes batches with on `device` (None: the DataLoader workers do it all).

    On CUDA batches cross PCIe as uint8 (a quarter of float32's bytes), from pinned memory and
    without blocking, and are normalized on the GPU with the workers' arithmetic
    (`build_batch_normalize`); on the CPU the workers normalize, in parallel with the step.
    With data.decode_on_device the batches are JPEG bytes, decoded and transformed there too
    (data/device_decode.py)."""
    return DeviceStage(data_cfg, device) if device.type == "cuda" or data_cfg.decode_on_device else None
