"""Validation every N steps and early stopping, through the real command line on digits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_train.config import TrainConfig
from dist_train.training.engine import due_after_step
from dist_train.training.tracking import read_metrics

from .conftest import DIGITS_CONFIG, run_cli

STEPS_PER_EPOCH = 1438 // 32


def train(digits_dir: Path, out: Path, *extra: str):
    return run_cli("train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
                   f"train.output_dir={out}", "model.name=small_cnn_gn", "train.progress_bar=false",
                   "tracking.wandb=false", "train.log_every_steps=5", "data.num_workers=0", *extra)


def validations(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if "seconds" not in k and "per_sec" not in k}
            for r in read_metrics(run / "metrics.jsonl") if "val/acc" in r]


def test_validation_is_due_every_n_steps_and_at_each_epoch_end():
    cfg = TrainConfig(val_every_steps=10)
    steps = range(1, 2 * STEPS_PER_EPOCH + 1)
    due = [step for step in steps if due_after_step(step, cfg, STEPS_PER_EPOCH, False).validate]
    assert due == [10, 20, 30, 40, 44, 50, 60, 70, 80, 88]


@pytest.mark.slow
def test_early_stopping_ends_cleanly_and_a_resume_does_not_train_on(digits_dir, tmp_path):
    """An LR too small to change the metric: the first validation is the best, the next two do
    not improve it, and with a patience of 2 the run ends after the third, exit 0."""
    out = tmp_path / "run"
    settings = ("train.epochs=6", "train.early_stop_patience=2", "optim.lr=1e-9", "sched.name=constant",
                "sched.warmup_epochs=0", "train.monitor=val/acc")
    done = train(digits_dir, out, *settings)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in validations(out)] == [44, 88, 132]
    assert f"stopped early after step 132 of {6 * STEPS_PER_EPOCH}: val/acc has not improved for 2 validations" \
        in done.stdout
    assert json.loads((out / "last" / "meta.json").read_text())["stopped_early"] is True
    assert json.loads((out / "best" / "meta.json").read_text())["step"] == 44
    summary = (out / "summary.md").read_text()
    assert "epochs run: 3 of 6, stopped early: val/acc did not improve for 2 validations after step 44" in summary

    again = train(digits_dir, out, *settings, "train.resume=auto")  # e.g. a requeued job
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in validations(out)] == [44, 88, 132]  # nothing trained, nothing logged twice


@pytest.mark.slow
def test_a_compiled_model_trains_and_resumes_exactly(digits_dir, tmp_path):
    """torch.compile (inductor's CPU kernels): a run, and a resume of it from step 20, end bit
    for bit alike; checkpoints carry the model's own parameter names, not the compiled wrapper's."""
    settings = ("train.epochs=1", "train.compile=true", "train.checkpoint_every_steps=20", "train.keep_checkpoints=5",
                "tracking.plots=false")
    reference = tmp_path / "reference"
    done = train(digits_dir, reference, *settings)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for later in ("checkpoints/step-00000040", f"checkpoints/step-{STEPS_PER_EPOCH:08d}", "last"):
        shutil.rmtree(resumed / later)
    done = train(digits_dir, resumed, *settings, "train.resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at epoch 0, step 20" in done.stdout
    ours = load_file(resumed / "last" / "model.safetensors")
    theirs = load_file(reference / "last" / "model.safetensors")
    assert not any(k.startswith("_orig_mod") for k in theirs)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_compile_where_the_platform_cannot_is_one_line_before_any_step(monkeypatch):
    from dist_train.errors import ConfigError
    from dist_train.runtime import accelerator

    monkeypatch.setattr(accelerator.shutil, "which", lambda name: None)  # no C++ compiler on PATH
    with pytest.raises(ConfigError, match=r"^train.compile=true: inductor needs a C\+\+ compiler for CPU kernels"):
        accelerator.make_accelerator(TrainConfig(cpu=True, compile=True))
