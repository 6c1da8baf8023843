"""`whole_run_vs_timm`: the whole-process wall time of a dist-train run over that of
benchmarks/timm_like_loop.py (what timm's train.py does per epoch), the same work: a held-out
set of 5,000 28 px grayscale images (4,000 train / 1,000 val), timm's resnet18 from
`timm.create_model`, SGD nesterov, cosine per step, label smoothing 0.1, no augmentation, batch
64, 2 workers, 8 epochs, 1 process. Alternating rounds (who goes first alternates too); the
figure is the median of the rounds' ratios. Best validation accuracy of both beside it.

    python -m benchmarks.bench_whole_run            # 5 rounds, about 10 minutes on 2 cores
    python -m benchmarks.bench_whole_run --quick    # 1 round of 1 epoch on 400 images

The images: sklearn's digits (real handwriting), each drawn several times at 28 px with its
own small rotation, shift and scale and a little noise; dist-train reads them from shards that
`make-shards --source imagefolder` wrote, timm from the same PNG files in ImageFolder layout
(the same train / val split). dist-train's run directory also gives the phases of its run
(its last lines: `time ...` from `start_run` on, and `--profile-startup`'s line).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TIMM_LOOP = [sys.executable, "-m", "benchmarks.timm_like_loop"]
MEAN, STD = 0.25, 0.35


def held_out_set(tmp: Path, samples: int, seed: int = 0) -> tuple[Path, Path]:
    """(shards, image folder) of the same `samples` images and split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    raw = tmp / "all"
    for i in range(samples):
        k = i % len(digits.images)
        label = int(digits.target[k])
        image = Image.fromarray((digits.images[k] * (255 / 16)).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        image = image.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
        canvas = Image.new("L", (28, 28))
        dx, dy = rng.integers(0, 9, size=2)
        canvas.paste(image, (int(dx), int(dy)))
        noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 12, size=(28, 28))
        (raw / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(raw / str(label) / f"{i:05d}.png")
    shards = tmp / "shards"
    subprocess.run([sys.executable, "-m", "dist_train", "make-shards", "--source", "imagefolder", "--root", str(raw),
                    "--out", str(shards), "--val-fraction", "0.2", "--shard-size", "500", "--seed", str(seed)],
                   check=True, capture_output=True, cwd=REPO)
    folder = tmp / "folder"  # the shards' split, as timm's ImageFolder layout
    for split in ("train", "val"):
        for shard in sorted(shards.glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                members = {m.name: m for m in tar.getmembers()}
                for name, member in members.items():
                    if name.endswith(".png"):
                        key = name.removesuffix(".png")
                        label = tar.extractfile(members[f"{key}.cls"]).read().decode().strip()
                        (folder / split / label).mkdir(parents=True, exist_ok=True)
                        (folder / split / label / Path(name).name).write_bytes(tar.extractfile(member).read())
    return shards, folder


def ours_command(shards: Path, out: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "dist_train", "train", "--config", str(REPO / "configs" / "digits_cpu.yaml"),
            "--profile-startup", f"data.train={shards}", f"data.val={shards}", f"train.output_dir={out}",
            f"train.epochs={epochs}", "data.image_size=28", "data.crop_pct=1.0", "data.augment=none",
            "data.batch_size=64", "data.num_workers=2", f"data.mean=[{MEAN}]", f"data.std=[{STD}]",
            "model.name=timm/resnet18", "loss.name=label_smoothing", "loss.label_smoothing=0.1",
            "optim.lr=0.1", "sched.warmup_epochs=0", "train.monitor=val/acc", "tracking.wandb=false"]


def timm_command(folder: Path, out: Path, epochs: int) -> list[str]:
    return [*TIMM_LOOP, "--data", str(folder), "--out", str(out), "--epochs", str(epochs),
            "--mean", str(MEAN), "--std", str(STD)]


def _timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def phases(stdout: str, wall: float) -> dict[str, float]:
    """Where dist-train's run went, from its own last lines (runtime/run_times.py): the
    interpreter and imports up to `start_run` (what the whole process took beyond the run),
    then the run's phases."""
    (line,) = [line for line in stdout.splitlines() if line.startswith("time ")]
    total = float(re.match(r"time (\d+\.\d+) s: ", line).group(1))
    named = {name.replace(" ", "_"): float(seconds)
             for name, seconds in re.findall(r"([a-z][a-z ]+?) (\d+\.\d+) s", line.split(": ", 1)[1])}
    return {"process_before_run": wall - total, **named}


def measure(quick: bool) -> dict[str, object]:
    rounds, epochs, samples = (1, 1, 400) if quick else (5, 8, 5000)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shards, folder = held_out_set(tmp, samples)
        ratios, ours_s, timm_s, ours_acc, timm_acc, breakdowns = [], [], [], [], [], []
        for round_ in range(rounds):
            ours_out, timm_out = tmp / f"ours-{round_}", tmp / f"timm-{round_}"
            sides = [("ours", ours_command(shards, ours_out, epochs)), ("timm", timm_command(folder, timm_out, epochs))]
            timed = {}
            for name, command in sides if round_ % 2 == 0 else sides[::-1]:
                timed[name] = _timed(command)
            (ours, ours_stdout), (theirs, _) = timed["ours"], timed["timm"]
            ratios.append(ours / theirs)
            ours_s.append(ours)
            timm_s.append(theirs)
            ours_acc.append(json.loads((ours_out / "best" / "meta.json").read_text())["metrics"]["val/acc"])
            with open(timm_out / "summary.csv") as f:
                timm_acc.append(max(float(row["eval_top1"]) for row in csv.DictReader(f)) / 100)
            breakdowns.append(phases(ours_stdout, ours))
            print(f"round {round_}: dist-train {ours:.1f} s (val/acc {ours_acc[-1]:.4f}), timm-like {theirs:.1f} s "
                  f"(top-1 {timm_acc[-1]:.4f}): {ratios[-1]:.3f}  {breakdowns[-1]}", file=sys.stderr, flush=True)
    return {
        "whole_run_vs_timm": statistics.median(ratios),
        "whole_run_rounds": [round(r, 3) for r in ratios],
        "whole_run_s": {"dist_train": statistics.median(ours_s), "timm_like": statistics.median(timm_s)},
        "whole_run_best_acc": {"dist_train": ours_acc, "timm_like": timm_acc},
        "whole_run_phases_s": {k: round(statistics.median(b[k] for b in breakdowns), 2) for k in breakdowns[0]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(measure(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
