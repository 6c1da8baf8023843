"""JPEG decoded on the training device (`data.decode_on_device`), its transforms following there.

For large images CPU decoding is what starves a GPU: an ImageNet JPEG takes milliseconds of a
core to decode, a whole batch a few on the GPU (nvjpeg through `torchvision.io.decode_jpeg`).
With the option on, DataLoader workers only read and check samples: a batch leaves them as the
JPEG files' bytes (`EncodedImages`), each with the seed its transforms draw from. The training
process then decodes the batch on its device at once and applies the same transforms there,
per sample, with the generator seeded exactly as a worker seeds it (a function of the sample's
global position, data/pipeline.py): the crops and flips are the ones the workers would draw,
whatever the number of processes, workers or accumulation steps, and after a resume. (The
pixels are not bit-for-bit the workers': decoders and resampling kernels differ in rounding.)

On the CPU the same path runs in the training process (tests; no gain there). torchvision
0.29 marks its image decoders deprecated in favour of TorchCodec's; `decode_jpeg` is still
torchvision's GPU JPEG decoder here, and the one place to change when it goes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from dist_train.config import DataConfig
from dist_train.data.transforms import build_batch_normalize, build_transform
from dist_train.errors import DataError


@dataclass
class EncodedImages:
    """A batch's JPEG files as uint8 tensors, the seed of each one's transforms, and whether
    they are training samples (random transforms) or evaluation ones."""

    data: list[torch.Tensor]
    seeds: list[int]
    train: bool

    def __len__(self) -> int:
        return len(self.data)

    def to(self, device, non_blocking: bool = False) -> EncodedImages:
        return self  # decode_jpeg reads the bytes from host memory, whatever the device

    def pin_memory(self) -> EncodedImages:  # called by the DataLoader with pin_memory=True
        return EncodedImages([d.pin_memory() for d in self.data], self.seeds, self.train)


def encoded_jpeg(data: bytes, max_pixels: int, where: str) -> torch.Tensor:
    """A JPEG file's bytes as a uint8 tensor, its header read (nothing decoded), or a DataError
    naming the sample: no JPEG, or more than `max_pixels` declared, as the workers' decoder
    (data/pipeline.py `decode_image`) would refuse it."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            width, height = img.size
    except (OSError, ValueError, Image.DecompressionBombError):
        raise DataError(f"{where} is not a JPEG image: data.decode_on_device decodes JPEG only") from None
    if width * height > max_pixels:
        raise DataError(f"{where}: {width} x {height} pixels, more than data.max_image_pixels={max_pixels}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DeviceStage:
    """What batches get on the device before the model: uint8 batches are normalized there;
    encoded ones (`EncodedImages`) are decoded, transformed per sample, then normalized."""

    def __init__(self, cfg: DataConfig, device: torch.device):
        self.device = device
        self.normalize = build_batch_normalize(cfg)
        self.mode = ImageReadMode.GRAY if cfg.channels == 1 else ImageReadMode.RGB
        self.transforms = {True: build_transform(cfg, train=True), False: build_transform(cfg, train=False)}

    def __call__(self, images: torch.Tensor | EncodedImages) -> torch.Tensor:
        if isinstance(images, EncodedImages):
            images = self._decoded(images)
        return self.normalize(images)

    def _decoded(self, batch: EncodedImages) -> torch.Tensor:
        try:
            decoded = decode_jpeg(batch.data, mode=self.mode, device=self.device)
        except RuntimeError as exc:
            raise DataError(f"a batch's JPEG images do not decode on {self.device}: {exc}") from None
        transform = self.transforms[batch.train]
        saved = torch.get_rng_state()
        try:
            out = []
            for image, seed in zip(decoded, batch.seeds, strict=True):
                torch.default_generator.manual_seed(seed)  # as the worker would have, for this sample
                out.append(v2.functional.to_image(transform(v2.functional.to_image(image))))
        finally:
            torch.set_rng_state(saved)
        return torch.stack(out)
