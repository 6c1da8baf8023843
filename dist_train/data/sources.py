"""Where images come from before they become shards: sklearn's digits (as classes or as tags),
a synthetic set, a folder, a CSV list.

Each source is a `LabeledImages`: class names plus a list of `RawSample` (a unique key, the
encoded image bytes, the image's file extension and an integer label). Encoding happens here
so the shard writer only copies bytes.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dist_train.data.shard_format import IMAGE_EXTENSIONS, IMAGE_FORMATS
from dist_train.errors import DataError


@dataclass(frozen=True)
class RawSample:
    key: str  # unique within the dataset; no "." (webdataset splits member names at the dot)
    load: Callable[[], bytes]  # encoded image bytes, read lazily so big folders stream
    ext: str  # "png", "jpg", ...
    label: int | tuple[int, ...]  # a class index; multi-label data: the sorted label indexes


@dataclass(frozen=True)
class LabeledImages:
    class_names: list[str]
    samples: list[RawSample]
    multilabel: bool = False


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
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # the demo's data only: scikit-learn (and scipy with it) is no core dependency
        raise DataError("--source digits reads scikit-learn's bundled digits: pip install 'dist-train[demo]'") from None

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
            checked_image(path, root, str(path))
            key = _key_for(path.relative_to(root), used_keys)
            samples.append(RawSample(key, path.read_bytes, ext, label))
    if not samples:
        raise DataError(f"{root}: no images with extensions {IMAGE_EXTENSIONS}")
    return LabeledImages([d.name for d in class_dirs], samples)


def checked_image(image: Path, folder: Path, where: str) -> None:
    """An image make-shards may pack: not a symlink leading out of the source's folder (a
    `leak.png` linked to /etc/shadow would become a shard member, readable by all, perhaps
    published), and a JPEG, PNG or WebP file by its header (what the training decoders accept;
    its name does not choose). Only the header is read here."""
    real, named = Path(os.path.realpath(image)), Path(os.path.abspath(image))
    if real != Path(os.path.normpath(named)) and not real.is_relative_to(os.path.realpath(folder)):
        raise DataError(f"{where} is a symlink to {real}, outside {folder}")
    try:
        with Image.open(image, formats=IMAGE_FORMATS):
            pass
    except (UnidentifiedImageError, OSError, ValueError):
        raise DataError(f"{where} is not a JPEG, PNG or WebP image") from None


def _key_for(relative: Path, used: set[str]) -> str:
    """A readable unique key from a relative path: dots and odd characters become '_'."""
    stem = relative.with_suffix("").as_posix()
    key = re.sub(r"[^A-Za-z0-9_/-]", "_", stem)
    candidate, n = key, 1
    while candidate in used:
        candidate, n = f"{key}_{n}", n + 1
    used.add(candidate)
    return candidate


def csv_list(path: str | Path, multilabel: bool = False) -> LabeledImages:
    """Images listed in a CSV file with a header `path,labels`: each image's path (relative to the
    CSV file's directory, or absolute) and its labels, class names separated by spaces or `;`
    (multi-label: any number, none included; else exactly one). Classes are the names found,
    sorted (numerically when all are integers)."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows or not {"path", "labels"} <= set(rows[0]):
        raise DataError(f"{path}: expected a header `path,labels` and at least one row")
    listed = []
    for line, row in enumerate(rows, start=2):
        names = re.split(r"[;\s]+", (row["labels"] or "").strip())
        names = [n for n in names if n]
        if not multilabel and len(names) != 1:
            raise DataError(f"{path}, line {line}: {len(names)} labels ({row['labels']!r}); one per image "
                            "(or --multilabel)")
        if bad := next((n for n in names if not n.isprintable()), None):
            raise DataError(f"{path}, line {line}: label {bad[:40]!r} holds a control character")
        image = Path(row["path"] or "")
        image = image if image.is_absolute() else path.parent / image
        ext = image.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS or not image.is_file():
            raise DataError(f"{path}, line {line}: {row['path']!r} is not an image file ({'/'.join(IMAGE_EXTENSIONS)})")
        checked_image(image, path.parent, f"{path}, line {line}: {row['path']!r}")
        listed.append((image, ext, names))
    every = {n for _, _, names in listed for n in names}
    numeric = all(re.fullmatch(r"[0-9]+", n) for n in every)  # ASCII digits: "²".isdigit() too
    classes = sorted(every, key=lambda n: (int(n) if numeric else 0, n))
    index = {name: i for i, name in enumerate(classes)}
    samples: list[RawSample] = []
    used_keys: set[str] = set()
    for image, ext, names in listed:
        labels = tuple(sorted({index[n] for n in names}))
        key = _key_for(image.relative_to(path.parent) if image.is_relative_to(path.parent) else
                       Path(image.name), used_keys)
        samples.append(RawSample(key, image.read_bytes, ext, labels if multilabel else labels[0]))
    return LabeledImages(classes, samples, multilabel)


# Tags of the digits 0-9 for the multi-label demo: properties anyone can check by eye.
DIGIT_TAGS = {
    "even": {0, 2, 4, 6, 8},
    "above_4": {5, 6, 7, 8, 9},
    "has_loop": {0, 6, 8, 9},  # a closed loop as these digits are usually written
    "prime": {2, 3, 5, 7},
    "straight_only": {1, 4, 7},  # drawn with straight strokes alone
}


def digit_tags() -> LabeledImages:
    """sklearn's digits, each image tagged with the properties of its digit (DIGIT_TAGS): a
    real multi-label set with no download. Every digit has at least one tag."""
    plain = digits()
    names = list(DIGIT_TAGS)
    samples = [
        RawSample(s.key, s.load, s.ext, tuple(i for i, tag in enumerate(names) if s.label in DIGIT_TAGS[tag]))
        for s in plain.samples
    ]
    return LabeledImages(names, samples, multilabel=True)
