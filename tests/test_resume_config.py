"""What a resumed run may change in its config (applied, and said) and what it may not (refused)."""

from __future__ import annotations

import pytest

from dist_train.config import load_config, to_dict
from dist_train.errors import ConfigError
from dist_train.training.resume_config import APPLIED_ON_RESUME, check_resume_config

from .conftest import DIGITS_CONFIG


def config(*overrides: str):
    return load_config(DIGITS_CONFIG, list(overrides))


def test_the_same_config_resumes_without_a_word():
    assert check_resume_config(to_dict(config()), config(), "ckpt") == []


def test_a_checkpoint_without_a_recorded_config_is_not_checked():
    assert check_resume_config(None, config("optim.lr=0.5"), "ckpt") == []


def test_how_long_and_where_apply_and_are_said():
    saved = to_dict(config("train.epochs=2"))
    changes = check_resume_config(saved, config("train.epochs=5", "tracking.wandb=false", "data.num_workers=0"),
                                  "ckpt")
    assert "train.epochs 2 -> 5 (the LR schedule is re-planned for the new length)" in changes
    assert "tracking.wandb True -> False" in changes and "data.num_workers 1 -> 0" in changes


@pytest.mark.parametrize("override, named", [
    ("optim.lr=0.05", "optim.lr 0.1 -> 0.05"),
    ("model.name=resnet18", "model.name 'small_cnn' -> 'resnet18'"),
    ("train.seed=7", "train.seed 0 -> 7"),
    ("data.augment=none", "data.augment 'light' -> 'none'"),
    ("loss.name=focal", "loss.name 'label_smoothing' -> 'focal'"),
    ("train.mixed_precision=bf16", "train.mixed_precision None -> 'bf16'"),
])
def test_what_the_saved_state_would_override_is_refused_naming_both_values(override, named):
    saved = to_dict(config())
    with pytest.raises(ConfigError) as caught:
        check_resume_config(saved, config(override), "RUN/checkpoints/step-00000010")
    message = str(caught.value)
    assert named in message and "\n" not in message
    assert message.startswith("train.resume: RUN/checkpoints/step-00000010 was trained with other settings")


def test_many_refused_changes_stay_one_short_line():
    saved = to_dict(config())
    changed = config("optim.lr=0.5", "optim.momentum=0.5", "optim.weight_decay=0.5", "sched.gamma=0.5",
                     "sched.min_lr=0.5", "loss.focal_gamma=0.5", "loss.label_smoothing=0.5", "train.seed=5")
    with pytest.raises(ConfigError, match=r"and 2 more; resume with") as caught:
        check_resume_config(saved, changed, "ckpt")
    assert len(str(caught.value)) < 600


def test_keys_the_checkpoint_predates_pass():
    saved = to_dict(config())
    del saved["data"]["max_image_pixels"]
    assert check_resume_config(saved, config("data.max_image_pixels=1000"), "ckpt") == []


def test_every_applied_key_exists():
    keys = {f"{section}.{key}" for section, values in to_dict(config()).items() for key in values}
    for key in APPLIED_ON_RESUME:
        assert key in keys or (key.endswith(".") and any(k.startswith(key) for k in keys)), key
