"""Damaged data under both policies, 2-process CPU DDP (and one process where indexing finds the
damage the same way): data.on_error=raise stops with one line naming the culprit;
data.on_error=skip trains on the rest and counts exactly what it left out.

One shard (or file) per kind of damage: a truncated tar, an image member that does not decode,
a sample without a label, a label that is not an integer, a label outside num_classes, an
empty shard, a missing shard file, a file that is not a tar.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from sklearn.datasets import load_digits

from dist_train.config import load_config
from dist_train.data.datasets import resolve_datasets
from dist_train.data.labels import LabelReader
from dist_train.data.resolve import scan_shard
from dist_train.data.tar_index import index_tar
from dist_train.errors import DataError

from .conftest import DIGITS_CONFIG, run_cli
from .test_distributed import accelerate_launch

DIGITS = load_digits()
PIXELS = (DIGITS.images * 255 / 16).astype(np.uint8)


def _write(path: Path, first: int, count: int, damage: dict[int, dict] | None = None) -> Path:
    """`count` digits from index `first`; `damage` replaces members of some samples."""
    with wds.TarWriter(str(path)) as sink:
        for i in range(first, first + count):
            sample = {"__key__": f"d{i:05d}", "png": PIXELS[i], "cls": int(DIGITS.target[i])}
            for member, value in (damage or {}).get(i - first, {}).items():
                if value is None:
                    del sample[member]
                else:
                    sample[member] = value
            sink.write(sample)
    return path


def _truncate_last_image(path: Path) -> None:
    _, members = index_tar(str(path))[-1]
    offset, size = members["png"]
    with open(path, "r+b") as f:
        f.truncate(offset + size // 2)


def damaged_dataset(root: Path) -> dict[str, list[str]]:
    """Shards by kind of damage (each damaged sample is one of 64, or of 32 when truncated)."""
    root.mkdir()
    kinds = {
        "good": _write(root / "good.tar", 0, 64),
        "no_label": _write(root / "no-label.tar", 64, 64, {5: {"cls": None}}),
        "label_not_integer": _write(root / "label-text.tar", 128, 64, {6: {"cls": b"seven"}}),
        "label_out_of_range": _write(root / "label-17.tar", 192, 64, {7: {"cls": 17}}),
        "truncated": _write(root / "truncated.tar", 256, 32),
        "undecodable_image": _write(root / "undecodable.tar", 288, 64, {9: {"png": b"\0" * 100}}),
        "empty": _write(root / "empty.tar", 0, 0),
        "not_a_tar": root / "not-a-tar.tar",
        "missing": root / "missing.tar",
    }
    _truncate_last_image(kinds["truncated"])
    kinds["not_a_tar"].write_bytes(np.random.default_rng(0).bytes(3000))
    val_good = _write(root / "val-good.tar", 1000, 40)
    val_bad = _write(root / "val-undecodable.tar", 1040, 20, {3: {"png": b"\0" * 100}})
    return {"kinds": {k: str(v) for k, v in kinds.items()}, "val": [str(val_good), str(val_bad)]}


# Samples each kind loses: the truncated shard's last sample, one sample each in the others;
# an empty, missing or non-tar file has no samples to count.
LOST = {"good": 0, "no_label": 1, "label_not_integer": 1, "label_out_of_range": 1, "truncated": 1,
        "undecodable_image": 1, "empty": 0, "not_a_tar": 0, "missing": 0}
CULPRIT = {"no_label": "has no .cls label", "label_not_integer": "is not an integer",
           "label_out_of_range": "outside 0..9", "truncated": "truncated", "undecodable_image": "not a decodable image",
           "empty": "empty shard", "not_a_tar": "unreadable tar shard", "missing": "missing shard file"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    return damaged_dataset(tmp_path_factory.mktemp("damaged") / "shards")


def _yaml_list(paths: list[str]) -> str:
    return "[" + ",".join(paths) + "]"


def _train_args(run_dir: Path, train: list[str], val: list[str], *overrides: str) -> list[str]:
    return ["train", "--config", str(DIGITS_CONFIG), f"data.train={_yaml_list(train)}", f"data.val={_yaml_list(val)}",
            "data.num_classes=10", f"train.output_dir={run_dir}", "tracking.wandb=false", "tracking.plots=false",
            "train.epochs=1", "data.batch_size=10", "data.num_workers=2", *overrides]


def _train(run_dir: Path, train: list[str], val: list[str], *overrides: str):
    return accelerate_launch("-m", "dist_train", *_train_args(run_dir, train, val, *overrides))


def _train_one_process(run_dir: Path, train: list[str], val: list[str], *overrides: str):
    return run_cli(*_train_args(run_dir, train, val, *overrides))


# Under 2-process DDP: damage found while indexing (before training) and damage found by a
# DataLoader worker mid-training, when the other rank waits in a collective. The other kinds are
# found by the same indexing code as "label_out_of_range": one process each is enough.
TWO_PROCESSES = ("label_out_of_range", "undecodable_image")


@pytest.fixture(scope="module")
def raised(dataset, tmp_path_factory) -> dict:
    """data.on_error=raise on each kind of damage: one run each, two at a time."""
    kinds, base = dataset["kinds"], tmp_path_factory.mktemp("raise")

    def run(kind: str):
        args = (base / kind, [kinds["good"], kinds[kind]], dataset["val"][:1])
        return _train(*args) if kind in TWO_PROCESSES else _train_one_process(*args)

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {kind: pool.submit(run, kind) for kind in sorted(CULPRIT)}
        return {kind: result.result() for kind, result in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CULPRIT))
def test_raise_stops_with_one_line_naming_the_culprit(dataset, raised, kind):
    kinds = dataset["kinds"]
    done = raised[kind]
    errors = {line for line in done.stderr.splitlines() if line.startswith("dist-train: error:")}
    assert done.returncode != 0
    assert len(errors) == 1, done.stderr[-3000:]  # each rank may say it, but it is the same line
    (error,) = errors
    assert kinds[kind] in error and CULPRIT[kind] in error, error
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_skip_trains_on_the_rest_and_counts_every_damaged_sample(dataset, tmp_path):
    kinds = dataset["kinds"]
    run_dir = tmp_path / "run"
    done = _train(run_dir, list(kinds.values()), dataset["val"], "data.on_error=skip", "data.batch_size=6")
    assert done.returncode == 0, done.stderr[-3000:]
    # Usable: 64 + 63 * 3 + 31 + 64 = 348 training samples (the undecodable one among them
    # until it is read), 2 ranks x 6 a step: 29 steps and nothing left over, so the epoch
    # reads every sample once.
    assert "348 train / 60 val samples, 29 steps per epoch of 12 images" in done.stdout
    for kind, problem in CULPRIT.items():
        if kind != "undecodable_image":  # found when read, not when indexed
            assert any(kinds[kind] in line and problem in line for line in done.stdout.splitlines()), kind
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "val/acc" in line][-1]
    # 4 found while indexing + the training image + the validation image.
    assert record["data/skipped_samples"] == sum(LOST.values()) + 1 == 6
    assert record["step"] == 29  # both ranks ran every step: no hang, no early stop
    assert "skipped 6 damaged samples" in done.stdout


@pytest.mark.slow
def test_skip_counts_an_undecodable_sample_each_time_it_is_read(dataset, tmp_path):
    kinds = dataset["kinds"]
    run_dir = tmp_path / "run"
    # The good shard and the undecodable one: 128 samples, 2 x 16 a step: 4 steps and nothing
    # left over, so every sample is read once an epoch.
    done = _train(run_dir, [kinds["good"], kinds["undecodable_image"]], dataset["val"],
                  "data.on_error=skip", "data.batch_size=16", "train.epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if "val/acc" in line]
    assert [r["data/skipped_samples"] for r in records] == [2, 2]  # the train image and the val one


def test_max_skipped_bounds_the_damage(dataset):
    kinds = dataset["kinds"]
    cfg = load_config(DIGITS_CONFIG, [f"data.train={_yaml_list(list(kinds.values()))}",
                                      f"data.val={_yaml_list(dataset['val'])}", "data.num_classes=10",
                                      "data.on_error=skip", "data.max_skipped=3"])
    with pytest.raises(DataError, match=r"4 damaged samples, more than data.max_skipped=3; the first: .*no-label"):
        resolve_datasets(cfg.data)
    cfg.data.max_skipped = 4
    datasets = resolve_datasets(cfg.data)
    assert datasets.train.skipped_samples == 4 and datasets.train.samples == 348


@pytest.mark.parametrize("member", ["cls", "png"])
def test_a_sample_cut_short_is_counted_whichever_member_is_cut(tmp_path, member):
    """The cut sample counts once, also when its first member is the one cut (no entry at all)."""
    shard = _write(tmp_path / "cut.tar", 0, 8)
    _, members = index_tar(str(shard))[-1]
    offset, size = members[member]
    with open(shard, "r+b") as f:
        f.truncate(offset + size // 2)
    scanned, damage = scan_shard(str(shard), LabelReader(10))
    assert scanned.samples == 7 and scanned.truncated
    assert sum(d.samples for d in damage) == 1, damage
