"""A full or read-only disk while saving: a one-line error, and the previous best still loads.

Runs on a real, small tmpfs (needs root to mount; CI runs as root). Root ignores file
permissions, so "read-only" is a read-only remount, as a failing disk would be.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
import torch

from dist_train.checkpoint import load_model_checkpoint, save_model_checkpoint
from dist_train.errors import CheckpointError
from dist_train.recipe.models import create_model


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {done.stderr}")
        pytest.skip(f"needs root to mount a small tmpfs: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return create_model("small_cnn", 10, 1).state_dict()


def _fill(disk, leave_bytes: int) -> None:
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))


def test_full_disk_during_save_keeps_the_previous_best(small_disk):
    first = _weights(0)
    save_model_checkpoint(small_disk / "best", first, {"epoch": 0})
    size = (small_disk / "best" / "model.safetensors").stat().st_size
    _fill(small_disk, leave_bytes=size // 2)  # the next save runs out of space half way

    with pytest.raises(CheckpointError) as err:
        save_model_checkpoint(small_disk / "best", _weights(1), {"epoch": 1})
    message = str(err.value)
    assert "\n" not in message
    assert str(small_disk / "best") in message and "No space left on device" in message
    assert "previous one there is intact" in message
    assert sorted(p.name for p in small_disk.iterdir()) == ["best", "filler"]  # no partial copy left

    state, meta = load_model_checkpoint(small_disk / "best")
    assert meta["epoch"] == 0
    assert all(torch.equal(state[k], first[k]) for k in first)

    (small_disk / "filler").unlink()  # space again: the next save works
    save_model_checkpoint(small_disk / "best", _weights(1), {"epoch": 1})
    assert load_model_checkpoint(small_disk / "best")[1]["epoch"] == 1


def test_read_only_disk_during_save_keeps_the_previous_best(small_disk):
    first = _weights(0)
    save_model_checkpoint(small_disk / "best", first, {"epoch": 0})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

    with pytest.raises(CheckpointError, match="Read-only file system"):
        save_model_checkpoint(small_disk / "best", _weights(1), {"epoch": 1})
    state, meta = load_model_checkpoint(small_disk / "best")
    assert meta["epoch"] == 0 and all(torch.equal(state[k], first[k]) for k in first)
