"""`dist-train bench`'s index figures: the training index of an ImageNet-sized dataset (1.28M
samples in 1,000 shards), built on a node and shared with DataLoader workers.

The shards are synthetic and hold no images: sparse files of the right sizes whose first and
last sample are real tar members (which the index checks), with the spans file and manifest
`make-shards` writes beside them (data/sample_index.py builds the node's index from those).
Measured: seconds from the resolved dataset to the node index built and every worker holding
it and answering (`index_build_s`), and what a worker holds of its own
(USS) plus its share (PSS) of the mapped index, after looking up spans spread over the whole
index (`index_worker_mb`, the largest of the workers).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

SHARDS = 1000
SAMPLE_BYTES = 2048  # a header and a block for each of two members
LOOKUPS = 20_000  # per worker, spread over the whole index
MAPPING = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")


class _Lookups(IterableDataset):
    """In a worker: look up spans all over the index, then report the worker's memory."""

    def __init__(self, index, shards):
        self.index, self.shards = index, shards

    def __iter__(self):
        rng = np.random.default_rng(os.getpid())
        for s, i in zip(rng.integers(0, len(self.shards), LOOKUPS), rng.integers(0, self.shards[0].samples, LOOKUPS),
                        strict=True):
            self.index.span(self.shards[s], int(i))
        yield _memory_mb(self.index.path)


def index_figures(tmp: Path, samples: int, num_workers: int = 2) -> dict[str, float]:
    from dist_train.data import workers
    from dist_train.data.resolve import resolve_shards
    from dist_train.data.sample_index import node_index

    dataset = _synthetic_dataset(tmp / "index-dataset", samples)
    shards = resolve_shards(str(dataset), "train", 1000).shards
    before = os.environ.get("DIST_TRAIN_INDEX_DIR")
    os.environ["DIST_TRAIN_INDEX_DIR"] = str(tmp / "index-cache")  # built here, not found from an earlier bench
    try:
        # The fork server as `dist-train train` starts it (cli.py): forked from this process, whose
        # imports the workers then share, else by exec. Before the clock: a training process starts
        # it seconds before its loaders, at the end of its imports.
        if not workers.fork_server_from_here():
            workers.start_helpers()
        start = time.perf_counter()
        index = node_index(shards)
        built = time.perf_counter() - start
        loader = DataLoader(_Lookups(index, shards), batch_size=None, **workers.loader_options(num_workers))
        per_worker = list(loader)
        shared = time.perf_counter() - start
    finally:
        if before is None:
            del os.environ["DIST_TRAIN_INDEX_DIR"]
        else:
            os.environ["DIST_TRAIN_INDEX_DIR"] = before
    return {"index_samples": samples, "index_build_s": shared, "index_build_only_s": built,
            "index_worker_mb": max(per_worker), "index_file_mb": os.path.getsize(index.path) / 2**20}


def _synthetic_dataset(out: Path, samples: int) -> Path:
    """A make-shards directory of `samples` samples without images: sparse shard files, the
    spans file and the manifest."""
    out.mkdir(parents=True)
    per_shard = samples // SHARDS
    entries = []
    for i in range(SHARDS):
        name = f"train-{i:06d}.tar"
        with open(out / name, "wb") as f:
            f.truncate(per_shard * SAMPLE_BYTES)
            for slot in (0, per_shard - 1):
                f.seek(slot * SAMPLE_BYTES)
                f.write(_tar_sample(f"{i:06d}-{slot:06d}"))
        entries.append({"file": name, "samples": per_shard})
    starts = np.arange(per_shard, dtype=np.int64) * SAMPLE_BYTES
    one_shard = np.stack([starts, starts + SAMPLE_BYTES], axis=1)
    np.save(out / "train.spans.npy", np.tile(one_shard, (SHARDS, 1)))
    manifest = {"format": "dist-train-shards", "version": 2, "classes": [str(c) for c in range(1000)],
                "splits": {"train": {"spans": "train.spans.npy", "shards": entries}}}
    (out / "dataset.json").write_text(json.dumps(manifest))
    return out


def _tar_sample(key: str) -> bytes:
    """A sample of two one-byte members, `SAMPLE_BYTES` long: each a header and a data block."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for ext in ("jpg", "cls"):
            member = tarfile.TarInfo(f"{key}.{ext}")
            member.size = 1
            tar.addfile(member, io.BytesIO(b"0"))
    return buffer.getvalue()[:SAMPLE_BYTES]  # without the end-of-archive blocks


def _memory_mb(mapped: str) -> float:
    """This process's private memory (USS) outside the mapping of `mapped`, plus its share
    (PSS) of that mapping. (Pages of the mapping that no other process maps yet are private
    too: counted once, in the share.)"""
    private = shared = 0
    in_mapping = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if MAPPING.match(line):  # a mapping's first line: its addresses ... its file
            in_mapping = line.endswith(mapped)
        elif in_mapping and line.startswith("Pss:"):
            shared += int(line.split()[1])
        elif not in_mapping and line.startswith(("Private_Clean:", "Private_Dirty:")):
            private += int(line.split()[1])
    return (private + shared) / 1024
