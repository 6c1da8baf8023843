"""A CPU run with wandb offline, its plots and summary, and `dist-train report`."""

from __future__ import annotations

import csv
import json
import os

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
    assert "wandb could not start (online)" in result.stderr
    assert (out / "best" / "meta.json").is_file()
    assert not (out / "loss.png").exists()


def test_tracking_can_be_switched_off(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
                     f"train.output_dir={out}", "train.epochs=1", "train.progress_bar=false", "tracking.wandb=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "wandb").exists()
    assert json.loads((out / "best" / "meta.json").read_text())["epoch"] == 0
