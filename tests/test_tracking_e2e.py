"""A CPU run with wandb offline, its plots and summary, and `dist-train report`."""

from __future__ import annotations

import csv
import json
import os
import re

import pytest
from PIL import Image
from sklearn.metrics import classification_report

from dist_train.training.report import PLOT_NAMES
from dist_train.training.tracking import read_metrics

from .conftest import DIGITS_CONFIG, run_cli
from .test_report import parse_table
from .wandb_history import history, run_info

pytestmark = pytest.mark.slow

NO_WANDB_KEY = {"WANDB_API_KEY": "", "NETRC": os.devnull, "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def tracked_run(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    result = run_cli(
        "train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
        f"train.output_dir={out}", "train.epochs=3", "train.progress_bar=false", "tracking.tags=[ci, digits]",
        env=NO_WANDB_KEY,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_offline_wandb_history_holds_the_logged_validation_metrics(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log_file = next(runs[0].glob("run-*.wandb"))
    rows = history(log_file)
    logged = [r for r in read_metrics(tracked_run / "metrics.jsonl") if "val/acc" in r]
    val_rows = [r for r in rows if "val/acc" in r]
    assert [r["_step"] for r in val_rows] == [r["step"] for r in logged]
    for row, record in zip(val_rows, logged, strict=True):
        for key in ("val/acc", "val/f1_macro", "val/precision_macro", "val/recall_macro", "val/auroc_macro",
                    "val/loss"):
            assert row[key] == pytest.approx(record[key], rel=1e-9), key
        assert row["val/confusion_matrix/_type"] == "table-file"
    assert any("train/loss" in r and "lr" in r and "images_per_sec" in r for r in rows)
    info = run_info(log_file)
    assert info["name"] == "run" and info["project"] == "dist-train" and info["tags"] == ["ci", "digits"]
    assert info["config"]["model"]["name"] == "small_cnn"
    assert info["config"]["train"]["output_dir"] == str(tracked_run)


def test_plots_and_summary_are_written(tracked_run):
    for name in PLOT_NAMES:
        with Image.open(tracked_run / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 300
    summary = (tracked_run / "summary.md").read_text()
    assert "best epoch" in summary and "val/f1_macro" in summary and "macro avg" in summary


def test_report_matches_sklearn_on_the_same_predictions(tracked_run, digits_dir, tmp_path):
    for name in PLOT_NAMES:
        (tracked_run / name).unlink()
    result = run_cli("report", str(tracked_run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert all((tracked_run / name).is_file() for name in PLOT_NAMES)  # regenerated
    preds = tmp_path / "preds.csv"
    shards = [str(p) for p in sorted(digits_dir.glob("val-*.tar"))]
    predicted = run_cli("predict", "--checkpoint", str(tracked_run / "best"), "--input", *shards, "--out", str(preds))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 359
    expected = classification_report([r["label"] for r in rows], [r["predicted"] for r in rows], output_dict=True,
                                      labels=[str(i) for i in range(10)], zero_division=0)
    table = parse_table(result.stdout.split("\n\nwrote")[0])
    for name in [str(i) for i in range(10)] + ["macro avg", "weighted avg"]:
        ref = expected[name]
        assert table[name][:3] == pytest.approx([ref["precision"], ref["recall"], ref["f1-score"]], abs=5e-5), name


def test_training_goes_on_when_wandb_cannot_start(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
        f"train.output_dir={out}", "train.epochs=1", "train.progress_bar=false", "tracking.mode=online",
        "tracking.plots=false", env={**NO_WANDB_KEY, "WANDB_BASE_URL": "http://127.0.0.1:9"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dist-train: warning: wandb (online) could not start: " in result.stderr  # one line, then on
    assert (out / "best" / "meta.json").is_file()
    assert not (out / "loss.png").exists()


def test_tracking_can_be_switched_off(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
                     f"train.output_dir={out}", "train.epochs=1", "train.progress_bar=false", "tracking.wandb=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "wandb").exists()
    assert json.loads((out / "best" / "meta.json").read_text())["epoch"] == 0


ALL_TRACKERS = ("tracking.tensorboard=true", "tracking.mlflow=true")


def test_a_killed_and_resumed_run_is_one_run_per_tracker_with_every_record_once(digits_dir, tmp_path):
    """wandb (offline), TensorBoard and MLflow (its file store), a 1-process run SIGKILLed
    (its process alone, as the kernel's OOM killer does) at its first record past its step-40 checkpoint
    and resumed: one run in each, every train and validation record in it once, equal to
    metrics.jsonl; read with wandb's offline files, TensorBoard's event reader and MLflow's client."""
    import subprocess
    import sys
    import time

    from .conftest import REPO
    from .test_resume import wait_for

    out = tmp_path / "run"
    args = ["train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
            f"train.output_dir={out}", "train.epochs=3", "train.progress_bar=false", "tracking.plots=false",
            "train.checkpoint_every_steps=20", "data.num_workers=0", "train.log_every_steps=5", *ALL_TRACKERS]
    env = {**os.environ, **NO_WANDB_KEY, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "dist_train", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "checkpoints" / "step-00000040", process)
        # Killed as soon as a record past the checkpoint is out (it reached the trackers, and
        # comes again on resume): a fixed sleep lets a fast machine finish the run first.
        deadline = time.monotonic() + 120
        while not any(r.get("step", 0) > 40 for r in read_metrics(out / "metrics.jsonl")):
            assert process.poll() is None and time.monotonic() < deadline, "no record past step 40"
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    assert not (out / "last").exists(), "the run ended before it was killed"
    resumed = run_cli(*args, "train.resume=auto", env=NO_WANDB_KEY)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "could not start" not in resumed.stderr
    assert len([r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]) == 132 // 5
    checkpoint = int(re.search(r"resuming from .* at epoch \d+, step (\d+)", resumed.stdout).group(1))
    assert_one_run_per_tracker(out, checkpoint, epochs=3)


def assert_one_run_per_tracker(out, checkpoint: int, epochs: int, stopped_cleanly: bool = False) -> None:
    """The run in `out`, launched twice (stopped after its checkpoint at step `checkpoint`, then
    resumed), is one run in wandb (offline), TensorBoard and MLflow, each train and validation
    record in it once and equal to metrics.jsonl, read back with each tracker's own reader.
    `stopped_cleanly`: the first launch ended by a stop signal (a Slurm requeue), not a kill, so
    its wandb file holds every record up to the checkpoint too."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_metrics(out / "metrics.jsonl")
    val = [(r["step"], r["val/acc"]) for r in records if "val/acc" in r]
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    assert [r["epoch"] for r in records if "val/acc" in r] == list(range(epochs))

    # wandb: one run id across both launches' offline files. Its service may not have written
    # what it was handed when a killed process died, so the resumed launch sends everything after
    # its checkpoint again: those steps once in its file, all equal to metrics.jsonl; wandb
    # keeps the first row of a step it gets twice (`wandb sync` of the two files in order).
    ids = json.loads((out / "trackers.json").read_text())
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))  # in launch order (by time)
    assert {path.parent.name.rsplit("-", 1)[1] for path in files} == {ids["wandb"]["run"]} and len(files) == 2
    for key, expected in (("val/acc", val), ("train/loss", train)):
        first, second = ([(r["_step"], r[key]) for r in history(path) if key in r] for path in files)
        assert second == [(step, value) for step, value in expected if step > checkpoint], key
        assert set(first) <= set(expected), key  # what the first launch wrote is right
        if stopped_cleanly:
            assert first == [(step, value) for step, value in expected if step <= checkpoint], key

    # TensorBoard: the events past what the first launch had sent are purged, the rest once.
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("val/acc")] == val
    assert [e.step for e in events.Scalars("train/loss")] == [step for step, _ in train]

    # MLflow: one run in the experiment, each metric's history one point per step.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "dist-train"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["mlflow"]["run"] and run.data.params["train.epochs"] == str(epochs)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/acc")] == val
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [s for s, _ in train]
