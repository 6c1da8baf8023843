"""The directories dist-train writes into hold only what it owns: the shard cache never counts
or evicts another file, reclaims what a dead download reserved, and its default directory (and
the training index's) is refused when another user could have planted it; a planted index is
not trusted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dist_train.data import remote, sample_index
from dist_train.data.local_dirs import private_temp_dir
from dist_train.data.resolve import resolve_shards
from dist_train.data.shard_cache import RemoteObject, ShardCache, path_for_part
from dist_train.errors import DataError


@pytest.fixture
def fake_downloads(monkeypatch):
    """remote.download writing `size` zero bytes, as a server would send the object whole."""
    def download(url: str, local_path: str, size: int) -> None:
        Path(local_path).write_bytes(b"\0" * size)

    monkeypatch.setattr(remote, "download", download)


def shard(i: int, size: int = 1000) -> RemoteObject:
    return RemoteObject(f"https://example.org/data/train-{i}-{size}.tar", size)


def test_evictions_spare_a_users_file_and_folder_in_the_cache_dir(fake_downloads, tmp_path):
    """A user's 1.5 kB file and a folder beside three copies in a 3 kB cache: the fourth shard
    evicts a copy, never the user's file; the folder is left alone (no IsADirectoryError)."""
    cache = ShardCache(tmp_path, 3000)
    (tmp_path / "notes.txt").write_bytes(b"x" * 1500)
    (tmp_path / "photos").mkdir()
    for i in range(4):
        assert cache.fetch(shard(i), None, needed_at=0.0)
    assert (tmp_path / "notes.txt").read_bytes() == b"x" * 1500 and (tmp_path / "photos").is_dir()
    assert cache.bytes_used() == 3000  # the user's bytes are not the cache's to count
    assert sum(cache.path(shard(i).url).exists() for i in range(4)) == 3


def test_a_dead_downloads_reservation_is_reclaimed(fake_downloads, tmp_path):
    """An unlocked `.part` (its process killed) reserving the whole budget does not block the
    next download for 300 s: it is removed under the budget lock."""
    cache = ShardCache(tmp_path, 3000)
    stale = path_for_part(cache.path(shard(9, 3000).url), 3000)
    stale.write_bytes(b"")
    assert cache.fetch(shard(0), None, needed_at=0.0, wait_until=None)
    assert not stale.exists() and cache.bytes_used() == 1000


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=r"^data\.cache_dir: .*file is not a directory$"):
        ShardCache(tmp_path / "file", 10)


@pytest.mark.parametrize("planted", ["symlink", "open to all", "another owner"])
def test_a_default_directory_another_user_could_have_made_is_refused(planted, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    path = tmp_path / f"dist-train-shards-{os.getuid()}"
    if planted == "symlink":  # evictions would unlink files in the folder it points to
        (tmp_path / "victim").mkdir()
        path.symlink_to(tmp_path / "victim")
    else:
        path.mkdir()
        if planted == "open to all":
            path.chmod(0o777)
        elif os.getuid() == 0:
            os.chown(path, 65534, 65534)  # nobody's
        else:
            pytest.skip("giving a directory to another user needs root (CI runs as root)")
    with pytest.raises(DataError) as caught:
        private_temp_dir("dist-train-shards", "data.cache_dir")
    assert str(caught.value).startswith(str(path)) and "set data.cache_dir" in str(caught.value)


def test_a_default_directory_is_made_private(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    path = private_temp_dir("dist-train-index", "DIST_TRAIN_INDEX_DIR")
    assert path.is_dir() and (path.stat().st_mode & 0o777) == 0o700


def test_a_planted_index_of_the_right_shape_is_rebuilt(digits_dir, tmp_path, monkeypatch):
    """Every row holding sample 0's span (it would train on each shard's first image for all of
    them): not trusted, built again from the shards."""
    monkeypatch.setenv("DIST_TRAIN_INDEX_DIR", str(tmp_path))
    shards = resolve_shards(str(digits_dir), "train", 10).shards
    built = sample_index.node_index(shards)
    true_spans = np.load(built.path).copy()
    planted = np.repeat(true_spans[:1], len(true_spans), axis=0)
    np.save(built.path, planted)
    again = sample_index.node_index(shards)
    assert np.array_equal(np.load(again.path), true_spans)
    np.save(built.path, true_spans.astype(np.float64))  # another dtype: also rebuilt, no traceback
    assert np.array_equal(np.load(sample_index.node_index(shards).path), true_spans)


def test_a_shard_replaced_with_its_size_and_mtime_kept_is_caught_by_its_sha256(digits_dir, tmp_path, monkeypatch):
    """Its manifest's sha256 is checked as the index is built; the change time (which no user
    can set back) makes a replaced file a new index, so a copy that keeps size and mtime is seen."""
    import shutil

    monkeypatch.setenv("DIST_TRAIN_INDEX_DIR", str(tmp_path / "index"))
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shards = resolve_shards(str(data), "train", 10).shards
    sample_index.node_index(shards)  # built and checked: the shards are make-shards' own
    shard = data / "train-000002.tar"
    before = shard.stat()
    damaged = bytearray(shard.read_bytes())
    damaged[-2048] ^= 0xFF  # a byte of the last sample's image, say
    shard.write_bytes(bytes(damaged))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size and shard.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(DataError, match=r"train-000002\.tar: its sha256 differs from its dataset\.json's"):
        sample_index.node_index(resolve_shards(str(data), "train", 10).shards)
