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


BILINEAR = v2.InterpolationMode.BILINEAR  # torchvision's presets give their policies the crop's interpolation


@pytest.mark.parametrize(("augment", "policy"), [
    ("randaugment", v2.RandAugment(interpolation=BILINEAR)),
    ("trivialaugment", v2.TrivialAugmentWide(interpolation=BILINEAR)),
    ("autoaugment", v2.AutoAugment(interpolation=BILINEAR)),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_policies_are_torchvisions_as_its_reference_recipe_applies_them(augment, policy, channels):
    """RandomResizedCrop, flip, the policy, erasing with the mean: as torchvision's references
    (`--auto-augment`, `--random-erase`) build them, draw for draw from the same seed."""
    mean = [0.25] * channels
    cfg = DataConfig(channels=channels, image_size=16, augment=augment, random_erasing=0.5, mean=mean, std=[0.3])
    reference = v2.Compose([v2.RandomResizedCrop(16, antialias=True), v2.RandomHorizontalFlip(), policy,
                            v2.ToImage(), v2.RandomErasing(p=0.5, value=[64] * channels)])
    ours = build_transform(cfg, train=True)
    for i, image in enumerate(_images("L" if channels == 1 else "RGB")):
        torch.manual_seed(i)
        expected = reference(image)
        torch.manual_seed(i)
        assert torch.equal(ours(image), expected)
    # Evaluation is the standard resize and center crop, never augmented.
    evaluation = build_transform(cfg, train=False)
    assert [type(t) for t in evaluation.transforms] == [v2.Resize, v2.CenterCrop, v2.ToImage]


def test_a_sample_draws_the_same_augmentation_from_the_same_seed_and_others_from_others():
    cfg = DataConfig(channels=3, image_size=16, augment="randaugment", random_erasing=0.5)
    transform = build_transform(cfg, train=True)
    image = _images("RGB", 1)[0]
    outputs = []
    for seed in (5, 5, 6, 7):
        torch.manual_seed(seed)
        outputs.append(transform(image))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2]) or not torch.equal(outputs[0], outputs[3])


def test_erasing_fills_with_the_dataset_mean_so_it_normalizes_to_zero():
    cfg = DataConfig(channels=3, image_size=16, augment="none", random_erasing=1.0, mean=[0.2, 0.4, 0.6],
                     std=[0.5, 0.5, 0.5])
    torch.manual_seed(0)
    image = build_transform(cfg, train=True)(Image.new("RGB", (16, 16), (255, 255, 255)))
    erased = (image != 255).all(dim=0)
    assert erased.any() and not erased.all()
    assert image[:, erased].T.unique(dim=0).tolist() == [[51, 102, 153]]
    normalized = build_batch_normalize(cfg)(image[None])[0]
    assert normalized[:, erased].abs().max() < 0.005  # the mean, up to 8-bit rounding
