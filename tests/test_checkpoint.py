from __future__ import annotations

import json
import os

import pytest
import torch

from dist_train.checkpoint import load_model_checkpoint, save_model_checkpoint
from dist_train.errors import CheckpointError


def state():
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}


def test_round_trip_and_overwrite(tmp_path):
    save_model_checkpoint(tmp_path / "best", state(), {"epoch": 1})
    save_model_checkpoint(tmp_path / "best", {k: v * 2 for k, v in state().items()}, {"epoch": 2})
    loaded, meta = load_model_checkpoint(tmp_path / "best")
    assert meta["epoch"] == 2
    assert torch.equal(loaded["w"], state()["w"] * 2)
    assert sorted(os.listdir(tmp_path)) == ["best"]  # no temporary leftovers


def test_tampered_or_truncated_weights_are_refused(tmp_path):
    path = save_model_checkpoint(tmp_path / "best", state(), {"epoch": 1})
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"do not match meta\.json"):
        load_model_checkpoint(path)
    meta = json.loads((path / "meta.json").read_text())
    del meta["weights_sha256"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model_checkpoint(path)


def test_crash_between_renames_leaves_previous_checkpoint(tmp_path):
    save_model_checkpoint(tmp_path / "best", state(), {"epoch": 1})
    # As if the process died after moving the old version aside, before the new one landed.
    os.replace(tmp_path / "best", tmp_path / ".best.old")
    loaded, meta = load_model_checkpoint(tmp_path / "best")
    assert meta["epoch"] == 1 and torch.equal(loaded["b"], torch.ones(3))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_model_checkpoint(tmp_path / "nothing")
