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


def model_checkpoint(path, **meta_changes):
    from dist_train.config import Config, to_dict
    from dist_train.recipe.models import create_model

    cfg = Config()
    cfg.model.name, cfg.data.channels, cfg.data.mean, cfg.data.std = "small_cnn", 1, [0.5], [0.5]
    meta = {"config": to_dict(cfg), "class_names": [str(i) for i in range(10)], "mixed_precision": "no"}
    return save_model_checkpoint(path, create_model("small_cnn", 10, 1).state_dict(), {**meta, **meta_changes})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mixed_precision": "fp8-garbage"}, "mixed_precision 'fp8-garbage' is not one of no, bf16, fp16"),
        ({"class_names": "0123456789"}, "class_names must be a list of names"),
        ({"config": {"data": {"image_size": 10**9}}}, "holds no valid config .*data.image_size must be at most"),
    ],
)
def test_checkpoint_metadata_is_checked_before_use(tmp_path, change, message):
    from dist_train.commands.predict import load_for_inference

    assert load_for_inference(model_checkpoint(tmp_path / "good")).class_names[3] == "3"
    with pytest.raises(CheckpointError, match=message):
        load_for_inference(model_checkpoint(tmp_path / "bad", **change))


def test_metadata_that_is_no_json_object_is_refused(tmp_path):
    path = model_checkpoint(tmp_path / "best")
    (path / "meta.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match=r"meta\.json: not a JSON object"):
        load_model_checkpoint(path)
