"""Samples are transformed to uint8 and normalized per batch: the values must be exactly those
of normalizing each sample on its own (the usual per-sample recipe)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from dist_train.config import DataConfig
from dist_train.data.pipeline import Collate
from dist_train.data.transforms import build_batch_normalize, build_transform


def _images(mode: str, count: int = 12) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shape = (21, 17) if mode == "L" else (21, 17, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(count)]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(("channels", "augment", "mean", "std"), [
    (1, "light", [0.25], [0.35]),
    (3, "standard", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
def test_batch_normalization_equals_normalizing_each_sample(train, channels, augment, mean, std):
    cfg = DataConfig(channels=channels, image_size=16, augment=augment, mean=mean, std=std)
    sample_transform = build_transform(cfg, train=train)
    per_sample = v2.Compose([sample_transform, build_batch_normalize(cfg)])
    images = _images("L" if channels == 1 else "RGB")

    torch.manual_seed(3)
    expected = torch.stack([per_sample(image) for image in images])
    torch.manual_seed(3)  # the same random augmentation for both
    samples = [(sample_transform(image), i, f"s{i}") for i, image in enumerate(images)]
    batch, labels, sources = Collate(cfg)(samples)

    assert samples[0][0].dtype == torch.uint8 and samples[0][0].shape == (channels, 16, 16)
    assert batch.dtype == torch.float32 and batch.shape == (len(images), channels, 16, 16)
    assert torch.equal(batch, expected)
    assert labels.tolist() == list(range(len(images))) and sources[1] == "s1"
