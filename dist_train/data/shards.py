"""Write a labelled image source as standard webdataset tar shards plus a `dataset.json` manifest.

Layout of the output directory:

    train-000000.tar ...   one `<key>.<png|jpg>` and one `<key>.cls` member per sample
    val-000000.tar ...
    dataset.json           class names and sample counts per shard and split

The split is stratified by class and, like the order inside the shards, a function of the seed
alone; members carry a fixed mtime, so the same inputs give byte-identical shards. Each shard
is written under a temporary name and renamed when complete, and the manifest is written last:
a directory with a manifest is a complete dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from dist_train import atomic_file
from dist_train.data.sources import LabeledImages, RawSample
from dist_train.errors import DataError

MANIFEST_NAME = "dataset.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SplitSummary:
    name: str
    # [{"file": "train-000000.tar", "samples": 256, "bytes": 1234, "sha256": "..."}, ...]: bytes
    # and sha256 check a copy fetched from a server (data/shard_cache.py).
    shards: list[dict[str, int | str]]

    @property
    def samples(self) -> int:
        return sum(int(s["samples"]) for s in self.shards)


def split_stratified(
    labels: list[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of (train, val): each class contributes round(val_fraction * n_class) to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train: list[int] = []
    val: list[int] = []
    for cls in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == cls)
        rng.shuffle(members)
        n_val = round(val_fraction * len(members))
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    # Shuffle within each split so every shard mixes the classes.
    return rng.permutation(train).tolist(), rng.permutation(val).tolist()


def write_split(
    samples: list[RawSample], out_dir: Path, split: str, shard_size: int
) -> SplitSummary:
    shards = []
    for start in range(0, len(samples), shard_size):
        name = f"{split}-{len(shards):06d}.tar"
        chunk = samples[start : start + shard_size]
        size, sha256 = _write_shard(chunk, out_dir / name)
        shards.append({"file": name, "samples": len(chunk), "bytes": size, "sha256": sha256})
    return SplitSummary(split, shards)


def _write_shard(samples: list[RawSample], path: Path) -> tuple[int, str]:
    """Write the shard; its size in bytes and sha256."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as stream:
        # encoder=False: we hand over bytes already. mtime=0 makes the bytes reproducible; an
        # int, as a float would add a pax header to every member.
        with wds.TarWriter(stream, encoder=False, mtime=0) as writer:
            for sample in samples:
                writer.write(
                    {
                        "__key__": sample.key,
                        sample.ext: sample.load(),
                        "cls": str(sample.label).encode("ascii"),
                    }
                )
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    with open(path, "rb") as f:
        return os.path.getsize(path), hashlib.file_digest(f, "sha256").hexdigest()


def make_shards(
    source: LabeledImages,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    shard_size: int = 1000,
    source_name: str = "",
) -> dict:
    """Write train and val shards and the manifest; return the manifest."""
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.glob("*.tar"))
    if stale or (out / MANIFEST_NAME).exists():
        raise DataError(f"{out} already holds shards ({', '.join(stale[:3]) or MANIFEST_NAME}); "
                        "choose an empty directory")
    labels = [s.label for s in source.samples]
    train_idx, val_idx = split_stratified(labels, val_fraction, seed)
    splits = [
        write_split([source.samples[i] for i in train_idx], out, "train", shard_size),
        write_split([source.samples[i] for i in val_idx], out, "val", shard_size),
    ]
    manifest = {
        "format": "dist-train-shards",
        "version": MANIFEST_VERSION,
        "source": source_name,
        "seed": seed,
        "classes": source.class_names,
        "num_classes": len(source.class_names),
        "splits": {s.name: {"samples": s.samples, "shards": s.shards} for s in splits},
    }
    atomic_file.write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest
