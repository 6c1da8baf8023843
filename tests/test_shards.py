from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dist_train.data import sources
from dist_train.data.labels import LabelReader
from dist_train.data.resolve import index_labels, resolve_shards
from dist_train.data.shard_writer import make_shards, split_stratified
from dist_train.errors import DataError


def digest(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_make_shards_is_deterministic_and_manifest_counts_match(tmp_path, digits_dir):
    again = tmp_path / "again"
    make_shards(sources.digits(), again, val_fraction=0.2, seed=0, shard_size=256, source_name="digits")
    assert digest(again) == digest(digits_dir)
    manifest = json.loads((digits_dir / "dataset.json").read_text())
    assert manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 1797
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            assert index_labels(str(digits_dir / entry["file"]), LabelReader(10))[0] == entry["samples"]
    other = tmp_path / "other"
    make_shards(sources.digits(), other, val_fraction=0.2, seed=1, shard_size=256)
    assert digest(other) != digest(digits_dir)


def test_shards_are_standard_webdataset(digits_dir):
    keys = set()
    for sample in wds.WebDataset(str(digits_dir / "val-{000000..000001}.tar"), shardshuffle=False):
        assert set(sample) >= {"__key__", "png", "cls"}
        assert Image.open(io.BytesIO(sample["png"])).size == (8, 8)
        assert 0 <= int(sample["cls"]) < 10
        keys.add(sample["__key__"])
    assert len(keys) == 359


def test_split_is_stratified():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    train, val = split_stratified(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(100))
    assert sorted(labels[i] for i in val) == [0] * 10 + [1] * 6 + [2] * 4


def test_image_folder_source(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), i * 40, np.uint8)).save(tmp_path / "imgs" / cls / f"x.{i}.png")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")
    data = sources.image_folder(tmp_path / "imgs")
    assert data.class_names == ["cat", "dog"]
    assert [s.key for s in data.samples] == [f"{c}/x_{i}" for c in ("cat", "dog") for i in range(3)]
    manifest = make_shards(data, tmp_path / "out", val_fraction=0.34, seed=0, shard_size=2)
    assert manifest["splits"]["val"]["samples"] == 2 and manifest["splits"]["train"]["samples"] == 4


def test_make_shards_refuses_a_directory_with_shards(digits_dir):
    with pytest.raises(DataError, match="already holds shards"):
        make_shards(sources.digits(), digits_dir)


def write_plain_shards(directory, labels, ext="jpg"):
    """Shards as someone else's pipeline writes them: webdataset.ShardWriter, no manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(directory / "part-%06d.tar"), maxcount=4, verbose=0) as sink:
        for i, label in enumerate(labels):
            sink.write({"__key__": f"img{i:04d}", ext: np.full((8, 8, 3), 10 * i % 255, np.uint8), "cls": label})


def test_plain_shards_are_indexed_without_manifest(tmp_path):
    write_plain_shards(tmp_path / "plain", [0, 1, 2, 1, 0, 2, 1, 1, 0, 2])
    shard_set = resolve_shards(str(tmp_path / "plain" / "part-{000000..000002}.tar"), "train", 3)
    assert [s.samples for s in shard_set.shards] == [4, 4, 2]
    assert shard_set.class_names is None
    assert resolve_shards(str(tmp_path / "plain" / "*.tar"), "train", 3).samples == 10
    assert resolve_shards(str(tmp_path / "plain"), "train", 3).samples == 10


def test_label_outside_num_classes_names_shard_and_key(tmp_path):
    write_plain_shards(tmp_path / "plain", [0, 1, 7, 1])
    with pytest.raises(DataError, match=r"part-000000.tar: sample 'img0002': label 7 is outside 0..2"):
        resolve_shards(str(tmp_path / "plain"), "train", 3)


def test_missing_and_corrupt_shards(tmp_path, digits_dir):
    with pytest.raises(DataError, match=r"missing shard file: .*train-000006.tar \(and 3 more\)"):
        resolve_shards(str(digits_dir / "train-{000000..000009}.tar"), "train", 10)
    broken = tmp_path / "broken.tar"
    broken.write_bytes((digits_dir / "val-000000.tar").read_bytes()[:1500] + b"\x01" * 700)
    with pytest.raises(DataError, match=r"broken\.tar: unreadable tar shard"):
        resolve_shards(str(broken), "val", 10)
    with pytest.raises(DataError, match="has no 'test' split"):
        resolve_shards(str(digits_dir), "test", 10)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"file": "../outside.tar", "samples": 3}, r"shard file '\.\./outside\.tar' is not a file inside"),
        ({"file": "/etc/passwd", "samples": 3}, r"shard file '/etc/passwd' is not a file inside"),
        ({"file": "train-000000.tar", "samples": "many"}, "has samples=many, not a count"),
        ({"file": "train-000000.tar", "samples": -5}, "has samples=-5, not a count"),
        ({"file": "train-000000.tar", "samples": float("inf")}, "has samples=inf, not a count"),
    ],
)
def test_a_manifest_naming_files_outside_or_counts_that_are_no_counts_is_refused(digits_dir, tmp_path, entry,
                                                                              message):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(digits_dir, copy)
    manifest = json.loads((copy / "dataset.json").read_text())
    manifest["splits"]["train"]["shards"][0] = entry
    (copy / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"dataset\.json: split 'train': .*{message}"):
        resolve_shards(str(copy), "train", 10)


def test_a_manifest_nested_thousands_deep_is_one_line(tmp_path):
    (tmp_path / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"dataset\.json: not a readable dist-train manifest"):
        resolve_shards(str(tmp_path), "train", 10)


@pytest.mark.parametrize(("content", "problem"), [
    (b"", r"empty shard \(no samples\)"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", r"not a tar shard but a web page \(it begins b'<!DOCTYPE"),
    (b"PK\x03\x04 a zip file, not a tar", r"not a tar shard \(it begins b'PK"),
])
def test_a_shard_without_samples_says_what_it_is(tmp_path, content, problem):
    (tmp_path / "train-000000.tar").write_bytes(content)
    with pytest.raises(DataError, match=problem):
        resolve_shards(str(tmp_path / "train-000000.tar"), "train", 10)


def test_make_shards_shows_its_progress_in_a_log(tmp_path, monkeypatch, capsys):
    """No terminal (stderr captured): a line per EVERY_S (0 here: each sample) on stderr, each
    counting on to the whole; stdout untouched. And no tqdm bar at all: even a disabled one
    starts tqdm's monitor thread, which would keep `dist-train train` from forking its workers'
    fork server."""
    from dist_train.data import sources
    from dist_train.data.shard_writer import make_shards
    from dist_train.runtime import progress_lines

    monkeypatch.setattr(progress_lines, "EVERY_S", 0.0)
    monkeypatch.setattr(progress_lines, "tqdm", lambda *args, **kwargs: pytest.fail("a tqdm bar off a terminal"))
    make_shards(sources.synthetic(40, 4, 8, seed=0), tmp_path / "out", val_fraction=0.25, shard_size=16)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 40 and captured.out == ""
    assert lines[0].startswith("make-shards: 1 of 40 images (2%), ") and lines[-1].startswith("make-shards: 40 of 40")


def test_the_digits_source_without_scikit_learn_names_the_extra(monkeypatch):
    """scikit-learn is the demo's extra, not a core dependency: without it, one line naming it."""
    import sys

    from dist_train.data.sources import digits
    from dist_train.errors import DataError

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn: ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"pip install 'dist-train\[demo\]'"):
        digits()
