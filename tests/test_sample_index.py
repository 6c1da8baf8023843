"""The node's training index (dist_train/data/sample_index.py): samples read by their spans
are webdataset's samples, from make-shards' spans file or from the tar headers; it is built
once per set of shards and rebuilt when one changes; it reaches a worker as a path."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import webdataset as wds

from dist_train.data.random_access import ShardReader
from dist_train.data.resolve import resolve_shards
from dist_train.data.sample_index import node_index
from dist_train.errors import DataError


@pytest.fixture(autouse=True)
def own_index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_TRAIN_INDEX_DIR", str(tmp_path / "index"))


def _webdataset_samples(urls: list[str]) -> list[dict]:
    return [{k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            for s in wds.WebDataset(urls, shardshuffle=False)]


def _read_all(shards, index) -> list[dict]:
    reader = ShardReader(index=index)
    samples = [reader.sample(shard, i) for shard in shards for i in range(shard.samples)]
    reader.close()
    return [{k: v for k, v in s.items() if k != "__url__"} for s in samples]


def test_samples_read_by_span_are_webdatasets_from_the_spans_file_and_from_the_headers(digits_dir, tmp_path):
    shards = resolve_shards(str(digits_dir), "train", 10).shards
    assert all(s.spans_file for s in shards)  # make-shards wrote them
    expected = _webdataset_samples([s.url for s in shards])
    assert _read_all(shards, node_index(shards)) == expected
    # The same shards without a manifest (as other tools write them): indexed from the headers.
    plain = tmp_path / "plain"
    plain.mkdir()
    for s in shards:
        shutil.copy(s.url, plain)
    foreign = resolve_shards(str(plain), "train", 10).shards
    assert not any(s.spans_file for s in foreign)
    index = node_index(foreign)
    assert _read_all(foreign, index) == expected
    written = np.load(str(digits_dir / "train.spans.npy"))
    assert (np.load(index.path) == written).all()


def test_the_index_is_built_once_and_again_when_a_shard_changes(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shards = resolve_shards(str(data), "train", 10).shards
    first = node_index(shards)
    built = os.stat(first.path).st_mtime_ns
    assert node_index(shards).path == first.path and os.stat(first.path).st_mtime_ns == built
    os.utime(shards[0].url, ns=(built, built + 10**9))  # rewritten, say
    assert node_index(shards).path != first.path


def test_spans_that_do_not_fit_the_shard_are_not_used(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    spans = np.load(data / "train.spans.npy")
    np.save(data / "train.spans.npy", spans + 512)  # every span shifted: the last ends past its shard
    shards = resolve_shards(str(data), "train", 10).shards
    assert _read_all(shards, node_index(shards)) == _webdataset_samples([s.url for s in shards])


def test_a_worker_gets_a_path_not_the_spans(digits_dir):
    shards = resolve_shards(str(digits_dir), "train", 10).shards
    index = node_index(shards)
    index.span(shards[0], 0)  # mapped here
    sent = pickle.dumps(index)
    assert len(sent) < 2000 and index.path.encode() in sent
    assert pickle.loads(sent).span(shards[3], 5) == index.span(shards[3], 5)


def test_a_span_that_no_longer_holds_its_sample_is_named(digits_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shards = resolve_shards(str(data), "train", 10).shards
    index = node_index(shards)
    start, end = index.span(shards[1], 7)
    with open(shards[1].url, "r+b") as f:  # its header overwritten after indexing
        f.seek(start)
        f.write(b"garbage" * 10)
    with pytest.raises(DataError, match=rf"train-000001.tar: sample 7 \(bytes {start}-{end}\): unreadable sample"):
        ShardReader(index=index).sample(shards[1], 7)
