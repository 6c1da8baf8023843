"""Image transforms (torchvision.transforms.v2): random augmentation for training, fixed for eval."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from dist_train.config import DataConfig

# Standard evaluation crop: resize the short side to size / 0.875, then center-crop `size`.
EVAL_CROP_RATIO = 0.875


def build_transform(cfg: DataConfig, train: bool) -> v2.Compose:
    size = cfg.image_size
    # Geometry runs on the PIL image (PIL's C kernels are several times faster per image
    # than tensor kernels on small images), then conversion to float and normalization.
    if train and cfg.augment == "standard":
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    elif train and cfg.augment == "light":
        geometry = [
            v2.Resize((size, size), antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        ]
    elif cfg.augment == "standard":
        geometry = [v2.Resize(round(size / EVAL_CROP_RATIO), antialias=True), v2.CenterCrop(size)]
    else:
        geometry = [v2.Resize((size, size), antialias=True)]
    mean, std = _per_channel(cfg.mean, cfg.channels), _per_channel(cfg.std, cfg.channels)
    return v2.Compose(
        [
            *geometry,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=mean, std=std),
        ]
    )


def _per_channel(values: list[float], channels: int) -> list[float]:
    return values * channels if len(values) == 1 else values
