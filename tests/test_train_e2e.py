"""End to end on one CPU process: the real command line, real shards, real digits."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from dist_train.training.tracking import read_metrics

from .conftest import DIGITS_CONFIG, run_cli
from .test_shards import write_plain_shards

pytestmark = pytest.mark.slow

METRICS = ("val/acc", "val/f1_macro", "val/precision_macro", "val/recall_macro", "val/auroc_macro", "val/loss")


@pytest.fixture(scope="module")
def digits_run(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    result = run_cli(
        "train", "--config", str(DIGITS_CONFIG), "--profile-startup", f"data.train={digits_dir}",
        f"data.val={digits_dir}", f"train.output_dir={out}", "train.epochs=6",
    )  # the progress as a log shows it: stdout is no terminal here
    assert result.returncode == 0, result.stderr[-3000:]
    (out.parent / "stdout.txt").write_text(result.stdout)
    return out


def test_without_a_terminal_progress_is_a_line_per_train_record(digits_run):
    """As under nohup or in a Slurm log: no bar, a line every train.log_every_steps (10) with
    the epoch, the step in it, the loss of the record metrics.jsonl holds, the LR and images/s."""
    stdout = (digits_run.parent / "stdout.txt").read_text()
    lines = re.findall(r"^epoch (\d+), step (\d+) of 44: loss (\d+\.\d{4}) \| lr (\S+) \| (\d+) img/s$", stdout,
                       re.MULTILINE)
    train = [r for r in read_metrics(digits_run / "metrics.jsonl") if "train/loss" in r]
    assert [(int(e), int(s) + 44 * int(e)) for e, s, *_ in lines] == [(r["epoch"], r["step"]) for r in train]
    assert [loss for *_, loss, _, _ in lines] == [f"{r['train/loss']:.4f}" for r in train]
    assert "\r" not in stdout  # no bar redrawn into the log


def test_profile_startup_names_each_phase_to_the_first_step(digits_run):
    stdout = (digits_run.parent / "stdout.txt").read_text()
    (line,) = [line for line in stdout.splitlines() if line.startswith("start-up")]
    phases = dict(re.findall(r"([a-z][a-z ,()]+?) (\d+\.\d\d) s", line.split(": ", 1)[1]))
    assert list(phases) == ["python and config", "helpers", "datasets", "imports", "fork server", "accelerator",
                            "model", "run directory", "training loader", "tracking",
                            "first step (workers, first batches)"]
    total = float(re.match(r"start-up (\d+\.\d\d) s", line).group(1))
    # The phases add up to the total before each is printed to 0.01 s: at most 0.005 s of
    # rounding in each printed figure.
    rounding = 0.005 * (len(phases) + 1) + 1e-9
    assert abs(sum(map(float, phases.values())) - total) <= rounding and 0 < total < 120


def test_the_last_lines_say_where_the_runs_time_went(digits_run):
    """The run's phases after start-up, each named, adding up to the run's total (to the
    rounding of the printed figures); 6 validations and 6 epoch checkpoints are in it."""
    stdout = (digits_run.parent / "stdout.txt").read_text()
    (line,) = [line for line in stdout.splitlines() if line.startswith("time ")]
    total = float(re.match(r"time (\d+\.\d\d) s: ", line).group(1))
    phases = dict(re.findall(r"([a-z][a-z ]+?) (\d+\.\d\d) s", line.split(": ", 1)[1]))
    assert list(phases) == ["to the first step", "training", "validation", "models", "checkpoints", "report",
                            "trackers"]
    assert abs(sum(map(float, phases.values())) - total) <= 0.005 * (len(phases) + 1) + 1e-9
    assert float(phases["training"]) > 0 and float(phases["validation"]) > 0 and float(phases["checkpoints"]) > 0
    assert stdout.splitlines()[-1].startswith("best val/f1_macro")


def test_digits_reaches_97_percent_and_writes_the_run_directory(digits_run):
    records = read_metrics(digits_run / "metrics.jsonl")
    val = [r for r in records if "val/acc" in r]
    train = [r for r in records if "train/loss" in r]
    assert [r["epoch"] for r in val] == list(range(6))
    assert all(set(METRICS) <= set(r) and "step" in r for r in val)
    assert train and all({"epoch", "step", "train/loss", "lr", "images_per_sec"} <= set(r) for r in train)
    assert max(r["val/acc"] for r in val) >= 0.97
    for name in ("config.yaml", "best/model.safetensors", "best/meta.json", "last/model.safetensors"):
        assert (digits_run / name).is_file(), name
    meta = json.loads((digits_run / "best" / "meta.json").read_text())
    best = max(val, key=lambda r: r["val/f1_macro"])
    assert meta["epoch"] == best["epoch"] and meta["metrics"]["val/f1_macro"] == best["val/f1_macro"]
    assert meta["class_names"] == [str(i) for i in range(10)]


def test_eval_reproduces_the_best_epochs_metrics(digits_run, digits_dir):
    result = run_cli("eval", "--checkpoint", str(digits_run / "best"), "--data", str(digits_dir), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    logged = json.loads((digits_run / "best" / "meta.json").read_text())["metrics"]
    assert evaluated["samples"] == 359
    for name in METRICS:
        assert evaluated[name] == pytest.approx(logged[name], abs=1e-6), name


def digit_pngs(folder: Path, count: int):
    """The first `count` digits as PNG files digit00.png, digit01.png, ...; the dataset."""
    digits = load_digits()
    folder.mkdir()
    for i in range(count):
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / f"digit{i:02d}.png")
    return digits


def test_predict_over_a_folder_of_pngs(digits_run, tmp_path):
    folder = tmp_path / "pngs"
    digits = digit_pngs(folder, 40)
    out = tmp_path / "preds.csv"
    result = run_cli("predict", "--checkpoint", str(digits_run / "best"), "--input", str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 40
    assert rows[0]["source"].endswith("digit00.png") and len(rows[0]["top_k"].split()) == 3
    correct = sum(int(r["predicted"]) == digits.target[i] for i, r in enumerate(rows))
    assert correct >= 36  # these are training-distribution digits; the model is ~98% accurate


def test_predict_that_fails_leaves_the_previous_csv_alone(digits_run, tmp_path):
    folder = tmp_path / "pngs"
    digit_pngs(folder, 3)
    (folder / "digit03.png").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    out.write_text("source,label,predicted,probability,top_k\nearlier.png,,3,0.9,3:0.9\n")
    before = out.read_bytes()
    result = run_cli("predict", "--checkpoint", str(digits_run / "best"), "--input", str(folder), "--out", str(out))
    assert result.returncode == 2 and "digit03.png is not a decodable image" in result.stderr, result.stderr[-3000:]
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["pngs", "preds.csv"]


def test_training_on_plain_shardwriter_shards(tmp_path):
    """jpg + cls written by webdataset.ShardWriter, no dataset.json: num_classes from config."""
    digits = load_digits()
    rgb = np.repeat((digits.images * 255 / 16).astype(np.uint8)[..., None], 3, axis=3)
    plain = tmp_path / "plain"
    plain.mkdir()
    import webdataset as wds

    for split, index in (("train", range(0, 1400)), ("val", range(1400, 1797))):
        with wds.ShardWriter(str(plain / f"{split}-%06d.tar"), maxcount=300, verbose=0) as sink:
            for i in index:
                sink.write({"__key__": f"s{i:05d}", "jpg": rgb[i], "cls": int(digits.target[i])})
    out = tmp_path / "run"
    result = run_cli(
        "train", "--config", str(DIGITS_CONFIG),
        f"data.train={plain}/train-{{000000..000004}}.tar", f"data.val={plain}/val-{{000000..000001}}.tar",
        "data.num_classes=10", "data.channels=3", "data.mean=[0.25]", "data.std=[0.35]",
        f"train.output_dir={out}", "train.epochs=4", "train.progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    val = [r for r in read_metrics(out / "metrics.jsonl") if "val/acc" in r]
    assert max(r["val/acc"] for r in val) >= 0.9
    meta = json.loads((out / "best" / "meta.json").read_text())
    assert meta["class_names"] == [str(i) for i in range(10)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train=nowhere/train-{000000..000003}.tar"], "missing shard file: nowhere/train-000000.tar"),
        (["data.num_classes=3"], "label 7 is outside 0..2"),
        (["train.mixed_precision=fp16", "train.cpu=true"], "fp16 is not supported on the CPU"),
        (["data.batch_size=4096"], "fewer than one global batch"),
    ],
)
def test_bad_input_stops_before_training_with_exit_2(tmp_path, overrides, message):
    write_plain_shards(tmp_path / "plain", [0, 1, 2, 7, 1, 0, 2, 1])
    shard_overrides = [f"data.train={tmp_path}/plain", f"data.val={tmp_path}/plain"]
    if "data.num_classes=3" not in overrides:
        shard_overrides.append("data.num_classes=10")
    result = run_cli("train", "--config", str(DIGITS_CONFIG), *shard_overrides, *overrides,
                     f"train.output_dir={tmp_path / 'run'}", "data.channels=3", "data.mean=[0.5]", "data.std=[0.5]")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dist-train: error:") and message in last
    assert not (tmp_path / "run" / "best").exists()


def test_fine_tuning_starts_from_a_runs_best_weights(digits_run, digits_dir, tmp_path):
    """model.weights=RUN/best: the run starts from those weights (its first validation is
    already as good as the source's best), says what it loaded, and records it in meta.json."""
    out = tmp_path / "tuned"
    result = run_cli(
        "train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
        f"train.output_dir={out}", "train.epochs=1", "train.progress_bar=false", "tracking.wandb=false",
        "tracking.plots=false", f"model.weights={digits_run / 'best'}", "optim.lr=0.001", "sched.warmup_epochs=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model.weights {digits_run / 'best'}: " in result.stdout and "tensors loaded" in result.stdout
    source = json.loads((digits_run / "best" / "meta.json").read_text())["metrics"]["val/acc"]
    (first,) = [r for r in read_metrics(out / "metrics.jsonl") if "val/acc" in r]
    assert first["val/acc"] >= source - 0.02  # a random start is at 0.1 after one epoch at this LR
    pretrained = json.loads((out / "best" / "meta.json").read_text())["pretrained"]
    assert pretrained["source"] == str(digits_run / "best") and pretrained["new"] == [] and pretrained["loaded"] > 10


def test_eval_and_predict_show_their_progress_in_a_log(digits_run, digits_dir, tmp_path, monkeypatch, capsys):
    """As make-shards does: lines on stderr (EVERY_S 0 here: each batch) counting to the whole."""
    from dist_train.commands.evaluate import evaluate_checkpoint
    from dist_train.commands.predict import load_for_inference, write_predictions
    from dist_train.runtime import progress_lines

    monkeypatch.setattr(progress_lines, "EVERY_S", 0.0)
    evaluate_checkpoint(digits_run / "best", str(digits_dir), batch_size=100)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"eval: {n} of 359 images (" + f"{100 * n // 359}%)"
                                                     for n in (100, 200, 300, 359)]
    write_predictions(load_for_inference(digits_run / "best"), [str(digits_dir / "val-000000.tar")],
                      tmp_path / "p.csv", batch_size=128)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("predict: 256 of 256 images (100%)") and len(lines) == 2
