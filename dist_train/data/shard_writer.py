"""Write a labelled image source as standard webdataset tar shards plus a `dataset.json` manifest.

Layout of the output directory:

    train-000000.tar ...   one `<key>.<png|jpg>` and one `<key>.cls` member per sample
    val-000000.tar ...     (`.cls`: "3", or for multi-label data "3,7")
    train.spans.npy ...    each sample's byte span in its shard, in shard order (an int64 array)
    dataset.json           class names, the task, and sample and class counts per shard and split

The split is stratified by class and, like the order inside the shards, a function of the seed
alone; members carry a fixed mtime, so the same inputs give byte-identical shards. Each shard
is written under a temporary name and renamed when complete, and the manifest is written last:
a directory with a manifest is a complete dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_train import atomic_file
from dist_train.data.labels import class_counts, summed_counts
from dist_train.data.shard_format import MANIFEST_NAME, MANIFEST_VERSION, SPANS_SUFFIX
from dist_train.data.sources import LabeledImages, RawSample
from dist_train.data.tar_index import index_tar_spans
from dist_train.errors import DataError
from dist_train.runtime.progress_lines import Progress


@dataclass(frozen=True)
class SplitSummary:
    name: str
    # [{"file": "train-000000.tar", "samples": 256, "bytes": 1234, "sha256": "...",
    #   "class_counts": [25, 27, ...]}, ...]: bytes and sha256 check a copy fetched from a server
    # (data/shard_cache.py); class_counts are samples per class (multi-label: per label).
    shards: list[dict]
    spans: str  # the file of its samples' byte spans in their shards (data/sample_index.py)

    @property
    def samples(self) -> int:
        return sum(int(s["samples"]) for s in self.shards)

    def class_counts(self, num_classes: int) -> list[int]:
        return list(summed_counts([tuple(s["class_counts"]) for s in self.shards], num_classes))


def split_stratified(
    labels: list[int | tuple[int, ...]], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of (train, val): each class contributes round(val_fraction * n_class) to val
    (multi-label: each combination of labels)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray([label_text(label) for label in labels])
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


def _fewer_of(indices: list[int], labels: list, fraction: dict[int, float]) -> list[int]:
    """`indices` keeping the first ceil(fraction x n) of each listed class (they are shuffled)."""
    kept, seen = [], dict.fromkeys(fraction, 0)
    totals = {c: sum(labels[i] == c for i in indices) for c in fraction}
    for i in indices:
        c = labels[i]
        if c in fraction:
            seen[c] += 1
            if seen[c] > math.ceil(fraction[c] * totals[c]):
                continue
        kept.append(i)
    return kept


def label_text(label: int | tuple[int, ...]) -> str:
    """A label as `.cls` holds it: "3", or a multi-label sample's "3,7" ("" for none)."""
    return ",".join(map(str, label)) if isinstance(label, tuple) else str(label)


def write_split(
    samples: list[RawSample], out_dir: Path, split: str, shard_size: int, num_classes: int = 0,
    progress: Progress | None = None,
) -> SplitSummary:
    shards, spans = [], []
    for start in range(0, len(samples), shard_size):
        name = f"{split}-{len(shards):06d}.tar"
        chunk = samples[start : start + shard_size]
        size, sha256 = _write_shard(chunk, out_dir / name, progress)
        shards.append({"file": name, "samples": len(chunk), "bytes": size, "sha256": sha256,
                       "class_counts": list(class_counts([s.label for s in chunk], num_classes))})
        spans += index_tar_spans(str(out_dir / name))[1]
    # Where each sample lies in its shard, for readers that read samples directly (training):
    # written now, it spares every node reading all the tar headers again before training.
    spans_file = f"{split}{SPANS_SUFFIX}"
    with atomic_file.replacing(out_dir / spans_file) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(spans, dtype=np.int64).reshape(-1, 2), allow_pickle=False)
    return SplitSummary(split, shards, spans_file)


def _write_shard(samples: list[RawSample], path: Path, progress: Progress | None = None) -> tuple[int, str]:
    """Write the shard; its size in bytes and sha256."""
    import webdataset as wds  # here: it imports torch, which resolving a dataset does not need

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
                        "cls": label_text(sample.label).encode("ascii"),
                    }
                )
                if progress is not None:
                    progress.advance(1)
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
    train_class_fraction: dict[int, float] | None = None,
) -> dict:
    """Write train and val shards and the manifest; return the manifest. `train_class_fraction`:
    keep only this fraction (rounded up) of these classes' training samples, the validation set
    untouched: an imbalanced training set measured on a balanced validation set."""
    if shard_size <= 0:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.glob("*.tar"))
    if stale or (out / MANIFEST_NAME).exists():
        raise DataError(f"{out} already holds shards ({', '.join(stale[:3]) or MANIFEST_NAME}); "
                        "choose an empty directory")
    labels = [s.label for s in source.samples]
    num_classes = len(source.class_names)
    train_idx, val_idx = split_stratified(labels, val_fraction, seed)
    if train_class_fraction:
        train_idx = _fewer_of(train_idx, labels, train_class_fraction)
    progress = Progress("make-shards", len(train_idx) + len(val_idx))
    splits = [
        write_split([source.samples[i] for i in train_idx], out, "train", shard_size, num_classes, progress),
        write_split([source.samples[i] for i in val_idx], out, "val", shard_size, num_classes, progress),
    ]
    progress.close()
    manifest = {
        "format": "dist-train-shards",
        "version": MANIFEST_VERSION,
        "source": source_name,
        "seed": seed,
        "task": "multilabel" if source.multilabel else "multiclass",
        "classes": source.class_names,
        "num_classes": num_classes,
        "splits": {s.name: {"samples": s.samples, "class_counts": s.class_counts(num_classes), "spans": s.spans,
                            "shards": s.shards}
                   for s in splits},
    }
    # Compact lists (class counts) on one line: the manifest stays readable at 1,000 classes.
    text = re.sub(r"\[\s+([-\d,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(manifest, indent=2))
    atomic_file.write_text(out / MANIFEST_NAME, text + "\n")
    return manifest
