"""Image transforms (torchvision.transforms.v2): random augmentation for training, fixed for eval.

A sample's transform ends at a uint8 tensor; turning a batch into normalized float32 is one
call per batch (`build_batch_normalize`). On small images torchvision's per-call overhead
made the two float steps a large share of a sample's transform time; on a batch they cost
almost nothing per image (benchmarks/RESULTS.md). Element by element the arithmetic is the same, so the values are
bitwise those of normalizing each sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from dist_train.config import DataConfig

# Learned or searched augmentation policies, applied after the standard crop and flip as in
# torchvision's reference recipes (`--auto-augment ra|ta_wide|imagenet`), with their defaults.
POLICIES = {
    "randaugment": v2.RandAugment,  # 2 ops of magnitude 9
    "trivialaugment": v2.TrivialAugmentWide,
    "autoaugment": v2.AutoAugment,  # the ImageNet policy
}
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class EvalGeometry:
    """How evaluation shapes an image: resize the short side (or, for `none`/`light`, the whole
    image to a square), then center-crop."""

    resize: int
    crop: int
    squash: bool  # resize to (crop, crop), no center crop: digits and documents are not cropped


def eval_geometry(cfg: DataConfig) -> EvalGeometry:
    """data.val_crop_size (default image_size) and data.val_resize_size (default
    floor(crop / crop_pct), timm's rule: 224 at 0.875 -> 256, at 0.95 -> 235)."""
    crop = cfg.val_crop_size or cfg.image_size
    if not natural_images(cfg):
        return EvalGeometry(resize=crop, crop=crop, squash=True)
    return EvalGeometry(resize=cfg.val_resize_size or math.floor(crop / cfg.crop_pct), crop=crop, squash=False)


def natural_images(cfg: DataConfig) -> bool:
    """Augmented by crops and flips in training, center-cropped in evaluation."""
    return cfg.augment == "standard" or cfg.augment in POLICIES


def build_transform(cfg: DataConfig, train: bool, size: int | None = None) -> v2.Compose:
    """PIL image -> uint8 tensor (C, H, W), augmented when `train`; `size`: the training crop
    in place of data.image_size (progressive resizing, data/resolution.py).

    Random choices draw from torch's default generator, which the training pipeline seeds per
    sample (data/pipeline.py): a sample's augmentation is a function of (seed, epoch, position).
    """
    size, interpolation = size or cfg.image_size, INTERPOLATIONS[cfg.interpolation]
    # Geometry and policies run on the PIL image (PIL's C kernels are several times faster per
    # image than tensor kernels on small images).
    if train and natural_images(cfg):
        steps = [v2.RandomResizedCrop(size, interpolation=interpolation, antialias=True), v2.RandomHorizontalFlip()]
        steps += [POLICIES[cfg.augment](interpolation=interpolation)] if cfg.augment in POLICIES else []
    elif train and cfg.augment == "light":
        steps = [
            v2.Resize((size, size), interpolation=interpolation, antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        ]
    elif train:
        steps = [v2.Resize((size, size), interpolation=interpolation, antialias=True)]
    else:
        geometry = eval_geometry(cfg)
        resize = (geometry.crop, geometry.crop) if geometry.squash else geometry.resize
        steps = [v2.Resize(resize, interpolation=interpolation, antialias=True)]
        steps += [] if geometry.squash else [v2.CenterCrop(geometry.crop)]
    steps.append(v2.ToImage())
    if train and cfg.random_erasing > 0:
        # On the uint8 image, before normalization: erased pixels get the dataset mean, which
        # normalizes to 0, the value torchvision's recipes erase with after normalizing.
        mean = [round(255 * m) for m in _per_channel(cfg.mean, cfg.channels)]
        steps.append(v2.RandomErasing(p=cfg.random_erasing, value=mean))
    return v2.Compose(steps)


def build_batch_normalize(cfg: DataConfig) -> v2.Compose:
    """uint8 images (N, C, H, W) -> float32 in [0, 1], normalized by the config's mean and std."""
    mean, std = _per_channel(cfg.mean, cfg.channels), _per_channel(cfg.std, cfg.channels)
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)])


def _per_channel(values: list[float], channels: int) -> list[float]:
    return values * channels if len(values) == 1 else values
