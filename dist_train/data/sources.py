"""Where images come from before they become shards: sklearn's digits, a synthetic set, a folder.

Each source is a `LabeledImages`: class names plus a list of `RawSample` (a unique key, the
encoded image bytes, the image's file extension and an integer label). Encoding happens here
so the shard writer only copies bytes.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dist_train.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class RawSample:
    key: str  # unique within the dataset; no "." (webdataset splits member names at the dot)
    load: Callable[[], bytes]  # encoded image bytes, read lazily so big folders stream
    ext: str  # "png", "jpg", ...
    label: int


@dataclass(frozen=True)
class LabeledImages:
    class_names: list[str]
    samples: list[RawSample]


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Fixed settings keep the bytes, and so the shards, identical run to run.
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def encode_jpeg(pixels: np.ndarray, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def digits() -> LabeledImages:
    """sklearn's bundled handwritten digits: 1,797 real 8x8 grayscale images, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; stretch to 0..255 so they are ordinary 8-bit images.
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    samples = [
        RawSample(f"digit{i:05d}", (lambda img=img: encode_png(img)), "png", int(label))
        for i, (img, label) in enumerate(zip(images, bunch.target, strict=True))
    ]
    return LabeledImages([str(c) for c in range(10)], samples)


def synthetic(num_samples: int, num_classes: int, image_size: int, seed: int) -> LabeledImages:
    """Learnable RGB images: each class has its own colour and stripe orientation, plus noise.

    For benchmarks and GPU checks where the content matters less than the bytes and shapes.
    """
    if num_samples <= 0 or num_classes <= 1 or image_size < 8:
        raise DataError("synthetic needs --num-samples > 0, --num-classes > 1, --image-size >= 8")
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(num_classes, 3))
    angles = np.linspace(0, np.pi, num_classes, endpoint=False)
    grid = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
    labels = rng.integers(0, num_classes, size=num_samples)
    noise_seeds = rng.integers(0, 2**31, size=num_samples)

    def render(label: int, noise_seed: int) -> bytes:
        local = np.random.default_rng(noise_seed)
        phase = local.uniform(0, 2 * np.pi)
        direction = np.cos(angles[label]) * grid[0] + np.sin(angles[label]) * grid[1]
        stripes = 40.0 * np.sin(2 * np.pi * 4 * direction + phase)
        pixels = colours[label][None, None, :] + stripes[..., None]
        pixels = pixels + local.normal(0, 20, size=pixels.shape)
        return encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8))

    samples = [
        RawSample(f"synth{i:07d}", (lambda lab=int(lab), s=int(s): render(lab, s)), "jpg", int(lab))
        for i, (lab, s) in enumerate(zip(labels, noise_seeds, strict=True))
    ]
    return LabeledImages([f"class{c}" for c in range(num_classes)], samples)


def image_folder(root: str | Path) -> LabeledImages:
    """The usual `root/<class>/<image>` layout; classes sorted by name, as torchvision does."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    samples: list[RawSample] = []
    used_keys: set[str] = set()
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.rglob("*")):
            ext = path.suffix.lower().lstrip(".")
            if not path.is_file() or ext not in IMAGE_EXTENSIONS:
                continue
            key = _key_for(path.relative_to(root), used_keys)
            samples.append(RawSample(key, path.read_bytes, ext, label))
    if not samples:
        raise DataError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
    return LabeledImages([d.name for d in class_dirs], samples)


def _key_for(relative: Path, used: set[str]) -> str:
    """A readable unique key from a relative path: dots and odd characters become '_'."""
    stem = relative.with_suffix("").as_posix()
    key = re.sub(r"[^A-Za-z0-9_/-]", "_", stem)
    candidate, n = key, 1
    while candidate in used:
        candidate, n = f"{key}_{n}", n + 1
    used.add(candidate)
    return candidate
