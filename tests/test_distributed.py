"""Real `accelerate launch` with 2 CPU processes over gloo: training, accumulation, metric sync."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from dist_train.recipe.metrics import ValidationMetrics
from dist_train.training.tracking import read_metrics

from .conftest import DIGITS_CONFIG, REPO, run_cli, run_reaped
from .distributed.accumulation_check import make_data, make_model, make_teacher
from .test_metrics import sklearn_multilabel_reference, sklearn_reference

pytestmark = pytest.mark.slow

CPU_DDP = REPO / "launch" / "cpu-ddp.yaml"
LAUNCH_TIMEOUT = 420  # seconds: a hang fails the test instead of stalling CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch_command(*args: str) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` of 2 CPU processes on a free port, and its environment (no W&B key)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(CPU_DDP), "--main_process_port", str(free_port()), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "WANDB_API_KEY": "", "NETRC": os.devnull}
    return cmd, env


def accelerate_launch(*args: str, timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    cmd, env = accelerate_launch_command(*args)
    return run_reaped(cmd, cwd=REPO, env=env, timeout=timeout)


def write_uneven_digit_shards(directory: Path, counts: list[int], offset: int = 0) -> str:
    """Plain ShardWriter-style shards (png + cls) of consecutive digits, `counts` per shard."""
    import webdataset as wds

    digits = load_digits()
    pixels = (digits.images * 255 / 16).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    index = offset
    for n, count in enumerate(counts):
        with wds.TarWriter(str(directory / f"part-{n:06d}.tar")) as sink:
            for _ in range(count):
                sink.write({"__key__": f"d{index:05d}", "png": pixels[index], "cls": int(digits.target[index])})
                index += 1
    return str(directory / f"part-{{000000..{len(counts) - 1:06d}}}.tar")


def ddp_digits_args(digits_dir: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("-m", "dist_train", "train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}",
            f"data.val={digits_dir}", f"train.output_dir={out}", "train.epochs=6", "train.progress_bar=false", *extra)


@pytest.fixture(scope="module")
def ddp_digits(digits_dir, tmp_path_factory):
    """The digits config trained by `accelerate launch` on 2 CPU processes: (output dir, stdout)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = accelerate_launch(*ddp_digits_args(digits_dir, out))
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout


def test_torchrun_trains_like_accelerate_launch(ddp_digits, digits_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m dist_train train ...` (accelerate reads torchrun's
    environment): the same processes, the same validations and weights, bit for bit."""
    out = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "WANDB_API_KEY": "", "NETRC": os.devnull}
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
           *ddp_digits_args(digits_dir, out, "tracking.wandb=false")]  # what it logs is not compared
    result = run_reaped(cmd, cwd=REPO, env=env, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es) on cpu (MULTI_CPU)" in result.stdout
    def validations(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k.startswith("val/")} for r in read_metrics(run / "metrics.jsonl")
                if "val/acc" in r]

    reference = ddp_digits[0]
    assert len(validations(out)) == 6 and validations(out) == validations(reference)
    theirs, mine = (load_file(str(run / "last" / "model.safetensors")) for run in (reference, out))
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)


def test_digits_trains_under_two_process_ddp(ddp_digits, digits_dir):
    out, stdout = ddp_digits
    assert "2 process(es) on cpu (MULTI_CPU)" in stdout
    val = [r for r in read_metrics(out / "metrics.jsonl") if "val/acc" in r]
    assert [r["epoch"] for r in val] == list(range(6))  # one writer: no duplicated records
    assert max(r["val/acc"] for r in val) >= 0.97
    meta = json.loads((out / "best" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # one wandb run, from the main process
    # Metrics synced across the two ranks equal one process's metrics on the whole val set.
    single = run_cli("eval", "--checkpoint", str(out / "best"), "--data", str(digits_dir), "--json")
    assert single.returncode == 0, single.stderr[-3000:]
    evaluated = json.loads(single.stdout.strip().splitlines()[-1])
    for name, value in meta["metrics"].items():
        assert evaluated[name] == pytest.approx(value, abs=1e-6), name
    assert evaluated["val/confusion_matrix"] == meta["confusion_matrix"]


def test_multilabel_digit_tags_train_under_two_process_ddp(tmp_path):
    """The multi-label demo (configs/digit_tags_cpu.yaml), shortened: trained on 2 processes; the
    synced metrics equal one process's `eval` of best/; predictions list the labels above the
    threshold with their probabilities; the report has the per-label table and class counts."""
    data = tmp_path / "digit_tags"
    made = run_cli("make-shards", "--source", "digit-tags", "--out", str(data), "--shard-size", "256")
    assert made.returncode == 0 and "(5 labels, multi-label)" in made.stdout, made.stderr[-2000:]
    out = tmp_path / "run"
    result = accelerate_launch(
        "-m", "dist_train", "train", "--config", str(REPO / "configs" / "digit_tags_cpu.yaml"), f"data.train={data}",
        f"data.val={data}", f"train.output_dir={out}", "train.epochs=4", "train.progress_bar=false",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    meta = json.loads((out / "best" / "meta.json").read_text())
    print(f"\nmulti-label digit tags, 2 processes, 4 epochs: best {meta['metrics']}")
    assert meta["world_size"] == 2 and meta["task"] == "multilabel" and meta["metrics"]["val/map_macro"] > 0.97
    assert meta["class_counts"]["val"] == [178, 179, 143, 144, 108]  # images per tag
    with ThreadPoolExecutor(max_workers=2) as pool:  # eval and predict side by side
        evaluating = pool.submit(run_cli, "eval", "--checkpoint", str(out / "best"), "--data", str(data), "--json")
        predicted = run_cli("predict", "--checkpoint", str(out / "best"), "--input", str(data / "val-000001.tar"),
                            "--out", str(tmp_path / "predictions.csv"))
        single = evaluating.result()
    assert single.returncode == 0, single.stderr[-3000:]
    evaluated = json.loads(single.stdout.strip().splitlines()[-1])
    for name, value in meta["metrics"].items():
        assert evaluated[name] == pytest.approx(value, abs=1e-6), name
    assert evaluated["val/per_label"]["confusion"] == meta["per_label"]["confusion"]
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 103 and list(rows[0]) == ["source", "labels", "predicted", "probabilities"]
    for row in rows:
        named = [item.split(":") for item in row["probabilities"].split(";") if item]
        assert [n for n, _ in named] == (row["predicted"].split(";") if row["predicted"] else [])
        assert all(float(p) >= 0.5 for _, p in named) and [float(p) for _, p in named] == sorted(
            (float(p) for _, p in named), reverse=True)
    exact = sum(set(row["labels"].split(";")) == set(row["predicted"].split(";")) for row in rows)
    assert exact >= 0.6 * len(rows)  # all tags right (subset accuracy over the whole val set: above)
    summary = (out / "summary.md").read_text()
    assert "## Per label (best epoch)" in summary and "## Samples per label" in summary
    assert "| has_loop | 570 | 143 |" in summary and (out / "per_label.png").is_file()


def test_accumulation_all_reduces_once_per_step_and_matches_one_big_batch(tmp_path):
    """Plain, then distilled from a teacher (kd-): the teacher adds no all-reduce, its loss
    averages over W x K x b as one batch's does, and it ends bitwise as it began."""
    accum, batch, steps = 4, 3, 5
    result = accelerate_launch(
        str(REPO / "tests" / "distributed" / "accumulation_check.py"),
        "--out", str(tmp_path), "--accum", str(accum), "--batch", str(batch), "--steps", str(steps),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    teacher = make_teacher()
    assert all(torch.equal(v, teacher.model.state_dict()[k])
               for k, v in load_file(str(tmp_path / "teacher-after.safetensors")).items())
    for prefix in ("", "kd-"):
        for rank in range(2):
            report = json.loads((tmp_path / f"{prefix}allreduces-rank{rank}.json").read_text())
            assert report["distributed_type"] == "MULTI_CPU" and report["world_size"] == 2
            assert report["optimizer_steps"] == steps
            # no_sync on the first K-1 micro-steps; one all-reduce (the model fits one bucket) on the last.
            assert report["per_micro_step"] == ([0] * (accum - 1) + [1]) * steps, prefix
        check_one_big_batch(tmp_path, prefix, 2 * accum * batch, steps, teacher if prefix else None)


def check_one_big_batch(out: Path, prefix: str, global_batch: int, steps: int, teacher) -> None:
    """The same training in one process with batches of W*K*b = 24."""
    from dist_train.config import SchedConfig
    from dist_train.recipe.optim import Schedule

    images, labels = make_data(steps * global_batch, seed=1)
    model = make_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    schedule = Schedule(optimizer, SchedConfig(name="cosine"), steps_per_epoch=steps, epochs=1)
    no_autocast = SimpleNamespace(autocast=contextlib.nullcontext)
    for s in range(steps):
        chunk = slice(s * global_batch, (s + 1) * global_batch)
        outputs = model(images[chunk])
        loss = torch.nn.functional.cross_entropy(outputs, labels[chunk])
        if teacher is not None:
            loss = teacher.loss(loss, outputs, images[chunk], no_autocast)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.after_optimizer_step()
    ddp = load_file(str(out / f"{prefix}ddp.safetensors"))
    reference = model.state_dict()
    assert set(ddp) == set(reference)
    for name, value in reference.items():
        assert torch.allclose(ddp[name], value, atol=1e-6, rtol=1e-5), (prefix, name)
    moved = sum((make_model(seed=0).state_dict()[k] - v).abs().sum() for k, v in reference.items())
    assert moved > 0.1  # the comparison is between trained weights, not two copies of the init
    # Each rank's moving average of the weights, kept with no collective: identical, bit for bit.
    ema = [load_file(str(out / f"{prefix}ema-rank{rank}.safetensors")) for rank in range(2)]
    assert set(ema[0]) == set(ema[1]) and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    assert not all(torch.equal(ema[0][k], ddp[k]) for k in ema[0])  # an average, not a copy


def write_uneven_digit_tag_shards(directory: Path, counts: list[int]) -> str:
    """Multi-label shards of consecutive digits tagged as make-shards' digit-tags source does:
    the labels as a `.cls` list ("0,2") in even-numbered shards, as a `.json` list in the others."""
    import webdataset as wds

    from dist_train.data.sources import DIGIT_TAGS

    digits = load_digits()
    pixels = (digits.images * 255 / 16).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    index = 0
    for n, count in enumerate(counts):
        with wds.TarWriter(str(directory / f"part-{n:06d}.tar")) as sink:
            for _ in range(count):
                tags = [i for i, members in enumerate(DIGIT_TAGS.values()) if digits.target[index] in members]
                label = {"cls": ",".join(map(str, tags))} if n % 2 == 0 else {"json": json.dumps(tags).encode()}
                sink.write({"__key__": f"d{index:05d}", "png": pixels[index], **label})
                index += 1
    return str(directory / f"part-{{000000..{len(counts) - 1:06d}}}.tar")


def _outputs(out: Path, total: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Both ranks' logits and labels, and the synced metrics; every sample read once."""
    keys = [k for rank in range(2) for k in json.loads((out / f"keys-rank{rank}.json").read_text())]
    assert len(keys) == total and len(set(keys)) == total  # every sample once, none padded or repeated
    per_rank = [torch.load(out / f"outputs-rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert sorted(len(o["labels"]) for o in per_rank) == [total // 2, total - total // 2]
    synced = json.loads((out / "synced.json").read_text())
    assert synced["world_size"] == 2
    return torch.cat([o["logits"] for o in per_rank]), torch.cat([o["labels"] for o in per_rank]), synced


def test_uneven_shards_prime_val_set_metrics_equal_sklearn_single_and_multi_label(tmp_path):
    """One launch: single-label digits, then digits tagged with several labels each."""
    pattern = write_uneven_digit_shards(tmp_path / "val", [13, 41, 47])  # 101 samples, a prime
    tagged = write_uneven_digit_tag_shards(tmp_path / "tagged", [13, 41, 47])
    result = accelerate_launch(
        str(REPO / "tests" / "distributed" / "eval_sync_check.py"), "--shards", pattern, "--out", str(tmp_path),
        "--multilabel-shards", tagged, "--num-labels", "5",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    logits, labels, synced = _outputs(tmp_path, 101)
    expected = sklearn_reference(logits, labels, 10)
    for name, value in expected.items():
        assert synced["values"][name] == pytest.approx(value, abs=1e-5), name
    # Top-5 counts, summed over the ranks: sklearn's top_k_accuracy_score on the union, to 1e-6.
    assert synced["values"]["val/acc_top5"] == pytest.approx(expected["val/acc_top5"], abs=1e-6)
    # Flip TTA: the metrics of the mean logits of each image and its mirror, averaged by hand.
    per_rank = [torch.load(tmp_path / f"outputs-rank{rank}.pt", weights_only=True) for rank in range(2)]
    tta_logits = torch.cat([o["tta_logits"] for o in per_rank])
    one_process = ValidationMetrics(10)  # the same float32 AUROC over the union, in one process
    one_process.update(tta_logits, labels)
    tta_expected = sklearn_reference(tta_logits, labels, 10) | {"val/auroc_macro": one_process.compute()[0]
                                                                 ["val/auroc_macro"]}
    for name, value in tta_expected.items():
        assert synced["tta_values"][name] == pytest.approx(value, abs=1e-6), name
    assert synced["tta_values"]["val/loss"] != synced["values"]["val/loss"]
    assert np.array(synced["confusion"]).sum() == 101

    logits, labels, synced = _outputs(tmp_path / "multilabel", 101)
    assert labels.shape == (101, 5) and 0 < labels.mean() < 1
    expected, per_label = sklearn_multilabel_reference(logits, labels)
    for name, value in expected.items():  # mAP, F1 micro / macro, subset accuracy, AUROC, loss
        assert synced["values"][name] == pytest.approx(value, abs=1e-5), name
    assert np.allclose(synced["confusion"]["ap"], per_label["ap"], atol=1e-5)
    assert np.allclose(synced["confusion"]["auroc"], per_label["auroc"], atol=1e-5)  # roc_auc_score per label
    assert synced["confusion"]["confusion"] == per_label["confusion"]


def test_training_on_fewer_shards_than_workers_finishes(tmp_path):
    """3 training shards of prime sizes, 2 ranks x 2 workers, K=2: equal batches, no hang; and
    a one-sample val set, so one rank validates nothing yet takes part in every sync."""
    train = write_uneven_digit_shards(tmp_path / "train", [101, 53, 7])
    val = write_uneven_digit_shards(tmp_path / "val", [1], offset=200)
    out = tmp_path / "run"
    result = accelerate_launch(
        "-m", "dist_train", "train", "--config", str(DIGITS_CONFIG), f"data.train={train}", f"data.val={val}",
        "data.num_classes=10", "data.num_workers=2", "data.batch_size=8", "train.grad_accum_steps=2",
        f"train.output_dir={out}", "train.epochs=2", "train.progress_bar=false", "train.log_every_steps=1",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "5 steps per epoch of 32 images" in result.stdout  # floor(161 / (2 x 2 x 8))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 11))
    assert [r["step"] for r in records if "val/acc" in r] == [5, 10]


def test_bf16_autocast_on_cpu(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
                     "train.mixed_precision=bf16", "train.epochs=2", f"train.output_dir={out}",
                     "train.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision bf16" in result.stdout
    meta = json.loads((out / "best" / "meta.json").read_text())
    assert meta["mixed_precision"] == "bf16" and meta["metrics"]["val/acc"] > 0.5
