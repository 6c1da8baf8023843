"""Hostile and malformed input, tried as an attacker would: no hang, no traceback, no silent NaN,
nothing lost.

One table: each case builds its input (a crafted shard, image, config, manifest or checkpoint,
or an act on a finished run), runs the real command line in a fresh process, and asserts the
exit code, the one line on stderr that names the culprit, and the time bound. Under
`data.on_error=skip` damaged data is a counted skip and exit 0 instead. The cases that used to
lose data also show that the run directory (best/, metrics.jsonl, the checkpoints, config.yaml)
is exactly as it was. Ctrl-C is in test_resume.py (it needs a run in flight).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dist_train.data.tar_index import TAR_BLOCK, index_tar
from dist_train.training.tracking import read_metrics

from .conftest import DIGITS_CONFIG, REPO, run_cli
from .test_image_decoding import declaring, png, saved_as
from .test_tar_fuzz import crafted, samples  # noqa: F401 - `samples` is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # each case timed against a bound

BOUND_SECONDS = 30  # each case, start-up of a fresh interpreter included


@dataclass
class Given:
    """What a case may build from: the digits dataset, a finished run, its own directory."""

    digits: Path
    run: Path  # a copy of the finished run, the case's to spoil
    tmp: Path
    samples: list  # six real digits (key, png, cls), for crafted shards


@dataclass(frozen=True)
class Case:
    build: Callable[[Given], list[str]]  # the command line's arguments after `dist-train`
    code: int = 2
    message: str = ""  # in the one line on stderr (exit 2), or in stdout (exit 0)
    keeps_run: bool = False  # the run directory must be byte for byte as it was


# --- inputs ------------------------------------------------------------------------------------

def _train(g: Given, train: str, *extra: str, out: Path | None = None) -> list[str]:
    return ["train", "--config", str(DIGITS_CONFIG), f"data.train={train}", f"data.val={g.digits}",
            "data.num_classes=10", f"train.output_dir={out or g.tmp / 'out'}", "train.epochs=1",
            "tracking.wandb=false", "tracking.plots=false", "train.progress_bar=false", "data.num_workers=0",
            "model.name=small_cnn_gn", "train.checkpoint_every_steps=20", *extra]


def _shards_with(g: Given, name: str, data: bytes) -> str:
    """One digits training shard (256 samples: 8 steps, an epoch in a second or two) plus one
    more: the hostile one."""
    folder = g.tmp / "shards"
    folder.mkdir()
    shutil.copy(g.digits / "train-000000.tar", folder)
    (folder / name).write_bytes(data)
    return str(folder / "*.tar")


def crafted_shard(case: str, *extra: str) -> Callable[[Given], list[str]]:
    return lambda g: _train(g, _shards_with(g, "hostile.tar", bytes(crafted(g.samples, case))), *extra)


def image_shard(image: bytes, *extra: str) -> Callable[[Given], list[str]]:
    """Six real digits and, among them, one sample whose .png is `image`; batches of 2, so
    that the epoch reads all 262 samples (none left past its last full step)."""
    def build(g: Given) -> list[str]:
        out = io.BytesIO()
        with wds.TarWriter(out, encoder=False) as sink:
            for i, (key, image_bytes, cls) in enumerate(g.samples):
                sink.write({"__key__": key, "png": image if i == 3 else image_bytes, "cls": cls})
        return _train(g, _shards_with(g, "hostile.tar", out.getvalue()), "data.batch_size=2", "data.val_batch_size=64",
                      *extra)
    return build


def zeroed_manifest_shard(*extra: str) -> Callable[[Given], list[str]]:
    """A copy of the digits dataset (with its dataset.json) whose first training shard has a
    zeroed block after its 20th sample."""
    def build(g: Given) -> list[str]:
        copy = g.tmp / "data"
        shutil.copytree(g.digits, copy)
        shard = copy / "train-000000.tar"
        _, members = index_tar(str(shard))[20]
        header = min(offset for offset, _ in members.values()) - TAR_BLOCK
        with open(shard, "r+b") as f:
            f.seek(header)
            f.write(bytes(TAR_BLOCK))
        return _train(g, str(copy), *extra)
    return build


def config(*overrides: str) -> Callable[[Given], list[str]]:
    return lambda g: _train(g, str(g.digits), *overrides)


def yaml_file(text: str) -> Callable[[Given], list[str]]:
    def build(g: Given) -> list[str]:
        path = g.tmp / "hostile.yaml"
        path.write_text(text)
        return ["train", "--config", str(path), f"data.train={g.digits}", f"data.val={g.digits}"]
    return build


def manifest_entry(entry: dict) -> Callable[[Given], list[str]]:
    def build(g: Given) -> list[str]:
        copy = g.tmp / "data"
        shutil.copytree(g.digits, copy)
        manifest = json.loads((copy / "dataset.json").read_text())
        manifest["splits"]["train"]["shards"][0] = entry
        (copy / "dataset.json").write_text(json.dumps(manifest))
        return _train(g, str(copy))
    return build


def checkpoint_meta(**changes) -> Callable[[Given], list[str]]:
    def build(g: Given) -> list[str]:
        meta_path = g.run / "best" / "meta.json"
        meta = json.loads(meta_path.read_text())
        if "whole" in changes:
            meta = changes["whole"]
        else:
            for dotted, value in changes.items():
                node = meta
                *parents, last = dotted.split("__")
                for part in parents:
                    node = node[part]
                node[last] = value
        meta_path.write_text(json.dumps(meta))
        return ["eval", "--checkpoint", str(g.run / "best"), "--data", str(g.digits)]
    return build


def resume(*overrides: str) -> Callable[[Given], list[str]]:
    return lambda g: _train(g, str(g.digits), "train.resume=auto", *overrides, out=g.run)


def every_checkpoint_damaged(g: Given) -> list[str]:
    for checkpoint in (g.run / "checkpoints").iterdir():
        with open(checkpoint / "model.safetensors", "r+b") as f:
            f.seek(-64, os.SEEK_END)
            f.write(bytes(64))
    return resume()(g)


def newest_state_json(change: Callable[[dict], None]) -> Callable[[Given], list[str]]:
    def build(g: Given) -> list[str]:
        newest = sorted((g.run / "checkpoints").iterdir())[-1]
        state = json.loads((newest / "state.json").read_text())
        change(state)
        (newest / "state.json").write_text(json.dumps(state))
        return resume()(g)
    return build


def metrics_cut_short(g: Given) -> list[str]:
    with open(g.run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 0, "step": 4')  # a full disk mid-line
    return resume()(g)


def run_dir_in_use(g: Given) -> list[str]:
    # Another run holds the directory's lock (the kernel's flock: our own process holds it here).
    fd = os.open(g.run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    g.tmp.joinpath("held").write_text(str(fd))
    return resume()(g)


def predictions_over_a_bad_image(g: Given) -> list[str]:
    images = g.tmp / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(images / f"{i}.png")
    (images / "3.png").write_bytes(b"not an image")
    (g.run / "preds.csv").write_text("source,label,predicted,probability,top_k\nkept.png,,3,0.9,3\n")
    return ["predict", "--checkpoint", str(g.run / "best"), "--out", str(g.run / "preds.csv"), "--input", str(images)]


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))  # what a malicious .pth would run instead


def evil_weights(g: Given) -> list[str]:
    import torch

    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode()}, g.tmp / "evil.pth")
    return config(f"model.weights={g.tmp / 'evil.pth'}")(g)


def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\ntrain: {epochs: *i}\n"


# --- the table ---------------------------------------------------------------------------------

CASES: dict[str, Case] = {
    # Crafted tar headers: once hangs of the index.
    "tar member of negative size": Case(crafted_shard("negative size"), message="negative member size at byte 2048"),
    "pax record of length 0": Case(crafted_shard("pax record of length 0"), message="malformed header at byte 0"),
    "pax record of negative length": Case(crafted_shard("pax record of negative length"),
                                          message="malformed header at byte 0"),
    "tar member of negative size, skip": Case(crafted_shard("negative size", "data.on_error=skip"), code=0,
                                              message="the unread rest of 1 shard(s) cut short"),
    "pax record of length 0, skip": Case(crafted_shard("pax record of length 0", "data.on_error=skip"), code=0,
                                         message="the unread rest of 1 shard(s) cut short"),
    # A zeroed block inside a shard without a manifest: once "the end", 10 of 32 samples trained.
    "zeroed block inside a shard": Case(crafted_shard("zeroed block inside"),
                                        message="a zeroed block at byte 2048, with data after it"),
    "zeroed block inside a shard, skip": Case(crafted_shard("zeroed block inside", "data.on_error=skip"), code=0,
                                              message="the unread rest of 1 shard(s) cut short"),
    # With a manifest the loss is counted: once 236 samples dropped while the log said "skipped 0".
    # make-shards' spans spare the start reading every header: the block is found where the
    # sample it cut is read, named with its shard, sample and bytes (data/sample_index.py).
    # Its dataset.json's sha256 tells the damage before a sample is read.
    "zeroed block inside a manifest's shard": Case(zeroed_manifest_shard(),
                                                   message="train-000000.tar: its sha256 differs from its "
                                                           "dataset.json's (replaced or damaged since make-shards"),
    "zeroed block inside a manifest's shard, skip": Case(
        zeroed_manifest_shard("data.on_error=skip", "data.max_skipped=1000"), code=0,
        message="left out 236 damaged samples"),
    # Images: once tracebacks, or decoded by any of PIL's decoders.
    "decompression bomb png": Case(image_shard(declaring(png(), 30000, 30000)), message="exceeds limit"),
    "png past data.max_image_pixels": Case(image_shard(png(size=(40, 40)), "data.max_image_pixels=1000"),
                                           message="40 x 40 pixels, more than data.max_image_pixels=1000"),
    "png with a huge compressed text chunk": Case(image_shard(png(text=bytes(4 << 20))), message="large"),
    "tiff named .png": Case(image_shard(saved_as("TIFF")), message="not a JPEG, PNG or WebP file"),
    "decompression bomb png, skip": Case(image_shard(declaring(png(), 30000, 30000), "data.on_error=skip"), code=0,
                                         message="skipped 1 damaged samples"),
    # Numbers: once tracebacks, or runs that trained on NaN to the end.
    "optim.momentum=-1": Case(config("optim.momentum=-1"), message="optim.momentum must be in [0, 1), got -1.0"),
    "optim.betas=[2.0, 0.999]": Case(config("optim.name=adamw", "optim.betas=[2.0, 0.999]"),
                                     message="optim.betas[0] must be in [0, 1), got 2.0"),
    "sched.warmup_epochs=inf": Case(config("sched.warmup_epochs=.inf"),
                                    message="sched.warmup_epochs must be a finite number, got inf"),
    "optim.lr=nan": Case(config("optim.lr=nan"), message="optim.lr must be a finite number, got nan"),
    "optim.lr=inf": Case(config("optim.lr=.inf"), message="optim.lr must be a finite number, got inf"),
    "optim.lr=1e308": Case(config("optim.lr=1e308"), message="optim.lr must be in (0, 100], got 1e+308"),
    "train.clip_grad_norm=nan": Case(config("train.clip_grad_norm=.nan"),
                                     message="train.clip_grad_norm must be a finite number, got nan"),
    "data.std=[nan]": Case(config("data.std=[.nan]"), message="data.std must be a finite number, got nan"),
    "train.seed=2**64": Case(config(f"train.seed={2**64}"), message="train.seed must be in [0, 4294967295]"),
    "mixup with focal loss": Case(config("loss.name=focal", "data.mixup_alpha=0.2"),
                                  message="which loss.name=focal does not take"),
    "model.weights: a pickle that would run code": Case(evil_weights, message="is refused unread"),
    "monitor of an EMA that is off": Case(config("train.monitor=val_ema/acc"),
                                          message="train.monitor=val_ema/acc needs train.ema_decay"),
    # YAML: the last of two keys once won silently; an alias bomb took 24 s and 254 MB of stderr.
    "a key given twice": Case(yaml_file("train:\n  epochs: 1\n  epochs: 1000\n"),
                              message="'epochs' is given twice in one section (lines 2 and 3)"),
    "billion laughs": Case(yaml_file(billion_laughs()), message="expands to more than 100,000 values"),
    # Manifests.
    "manifest file outside the dataset": Case(manifest_entry({"file": "../../etc/passwd", "samples": 3}),
                                              message="is not a file inside"),
    "manifest samples: many": Case(manifest_entry({"file": "train-000000.tar", "samples": "many"}),
                                   message="has samples=many, not a count"),
    "manifest samples: Infinity": Case(manifest_entry({"file": "train-000000.tar", "samples": float("inf")}),
                                       message="has samples=inf, not a count"),
    "manifest samples: -5": Case(manifest_entry({"file": "train-000000.tar", "samples": -5}),
                                 message="has samples=-5, not a count"),
    # Checkpoint metadata: once an AttributeError, accelerate's ValueError, a MemoryError after 29 s.
    "meta.json a JSON list": Case(checkpoint_meta(whole=[1, 2]), message="meta.json: not a JSON object"),
    "meta.json garbage precision": Case(checkpoint_meta(mixed_precision="fp9000"),
                                        message="mixed_precision 'fp9000' is not one of no, bf16, fp16"),
    "meta.json enormous image size": Case(checkpoint_meta(config__data__image_size=10**9),
                                          message="data.image_size must be at most 16384"),
    # What once lost data silently: each leaves the run exactly as it was.
    "resume=auto with no usable checkpoint": Case(every_checkpoint_damaged, keeps_run=True,
                                                  message="none of its 2 checkpoints is usable"),
    "a second run into a directory in use": Case(run_dir_in_use, keeps_run=True, message="is in use by"),
    "resume with another optim.lr": Case(resume("optim.lr=0.05"), keeps_run=True,
                                         message="which a resumed run cannot change: optim.lr 0.1 -> 0.05"),
    "resume with another model": Case(resume("model.name=resnet18"), keeps_run=True,
                                      message="model.name 'small_cnn_gn' -> 'resnet18'"),
    "predict --out over a bad image": Case(predictions_over_a_bad_image, keeps_run=True,
                                           message="3.png is not a decodable image"),
    # ... or goes on from what is intact.
    "metrics.jsonl cut short by a full disk": Case(metrics_cut_short, code=0, message="resuming from"),
    "state.json with zero partitions": Case(newest_state_json(lambda s: s["order"].update(partitions=0)), code=0,
                                            message="step-00000040 at epoch 0, step 40"),
    "state.json with a negative step": Case(newest_state_json(lambda s: s["position"].update(global_step=-3)),
                                            code=0, message="step-00000040 at epoch 0, step 40"),
    "state.json without its position": Case(newest_state_json(lambda s: s.pop("position")), code=0,
                                            message="step-00000040 at epoch 0, step 40"),
    "resume with more epochs": Case(resume("train.epochs=2"), code=0,
                                    message="train.epochs 1 -> 2 (the LR schedule is re-planned"),
}


@pytest.fixture(scope="module")
def finished_run(digits_dir, tmp_path_factory) -> Path:
    """One epoch of digits: best/, last/, checkpoints at steps 40 and 44, metrics.jsonl."""
    given = Given(digits_dir, Path("unused"), tmp_path_factory.mktemp("finished"), [])
    out = given.tmp / "run"
    done = run_cli(*_train(given, str(digits_dir), "train.log_every_steps=10", out=out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000040", "step-00000044"]
    return out


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


@dataclass
class Outcome:
    done: subprocess.CompletedProcess
    seconds: float
    before: dict[str, str]  # the run directory's files before and after
    after: dict[str, str]
    tmp: Path


@pytest.fixture(scope="module")
def outcomes(digits_dir, finished_run, samples, tmp_path_factory) -> dict[str, Outcome]:  # noqa: F811 - fixture
    """Every case, two at a time (the machine's two cores): each a fresh process, so the
    suite pays for their start-ups in parallel; each still within its own time bound."""
    def run_case(name: str) -> Outcome:
        tmp = tmp_path_factory.mktemp("case")
        run = tmp / "run"
        shutil.copytree(finished_run, run)
        args = CASES[name].build(Given(digits_dir, run, tmp, samples))
        before = _snapshot(run)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "dist_train", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=BOUND_SECONDS * 2,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})
        seconds = time.monotonic() - started
        if (tmp / "held").exists():  # the lock another run held
            os.close(int((tmp / "held").read_text()))
        return Outcome(done, seconds, before, _snapshot(run), tmp)

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = dict(zip(CASES, pool.map(run_case, CASES), strict=True))
    slowest = sorted(outcomes.items(), key=lambda item: -item[1].seconds)[:8]
    print("\nslowest cases: " + "; ".join(f"{name} {o.seconds:.1f} s" for name, o in slowest))
    return outcomes


@pytest.mark.parametrize("name", CASES)
def test_hostile_input(name, outcomes):
    case, outcome = CASES[name], outcomes[name]
    done = outcome.done
    assert done.returncode == case.code, f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert outcome.seconds < BOUND_SECONDS, f"{name}: {outcome.seconds:.1f} s"
    if case.code == 2:
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dist-train: error: "), done.stderr[-3000:]
        assert case.message in lines[0] and len(lines[0]) < 600, lines[0]
    else:
        assert case.message in done.stdout, done.stdout[-3000:]
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if case.keeps_run:
        assert outcome.after == outcome.before, "the run directory changed"
    if "skip" in name:  # counted where it can be: what a manifest or a decoder says was lost
        (record,) = [r for r in read_metrics(outcome.tmp / "out" / "metrics.jsonl") if "val/acc" in r]
        assert record["data/skipped_samples"] > 0 or "the unread rest of" in done.stdout
