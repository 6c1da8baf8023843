"""The training recipe's options on real data, few images per class: does each one help?

    .venv/bin/python benchmarks/recipe.py                 # 7 variants x 5 seeds, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/recipe.py --seeds 1 --epochs 5   # a smoke run
    .venv/bin/python benchmarks/recipe.py --variants baseline BCE repeated   # those whose names hold these

sklearn's digits (real 8x8 scans, no download): 20 training images per class, 50 other
validation images per class, picked per seed. Each variant is configs/digits_cpu.yaml (light
affine jitter, label smoothing, SGD + cosine) plus one option, or all of them, trained through
`dist-train train` on one process. Reported: the final validation accuracy (of the moving
average, for the variants that keep one), mean and spread over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits_cpu.yaml"
EMA = ("train.ema_decay=0.99", "train.ema_warmup=true")
VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline (digits_cpu.yaml)": (),
    "+ random erasing 0.25": ("data.random_erasing=0.25",),
    "+ mixup 0.2": ("data.mixup_alpha=0.2",),
    "+ cutmix 1.0 (half the batches)": ("data.cutmix_alpha=1.0", "data.mix_prob=0.5"),
    "+ EMA 0.99 (warmup)": EMA,
    "trivialaugment instead of light": ("data.augment=trivialaugment",),
    "all but trivialaugment": ("data.random_erasing=0.25", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
                               "data.mix_prob=0.5", *EMA),
    "+ repeated augmentation 3": ("data.repeated_augment=3",),
    "BCE instead of cross-entropy (smoothing 0.05 kept)": ("loss.name=bce",),
    "BCE, target threshold 0.2, mixup 0.1 + cutmix 1.0": ("loss.name=bce", "loss.bce_target_threshold=0.2",
                                                           "data.mixup_alpha=0.1", "data.cutmix_alpha=1.0"),
    "BCE + LAMB (lr 0.01, wd 0.02), as RSB": ("loss.name=bce", "optim.name=lamb", "optim.lr=0.01",
                                               "optim.weight_decay=0.02"),
}


def write_subset(out: Path, seed: int, train_per_class: int, val_per_class: int) -> tuple[str, str]:
    """Train and validation shards of disjoint digits, so many per class, chosen by `seed`."""
    from sklearn.datasets import load_digits

    from dist_train.data.sources import encode_png

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    picks: dict[str, list[int]] = {"train": [], "val": []}
    for label in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        picks["train"] += members[:train_per_class].tolist()
        picks["val"] += members[train_per_class:train_per_class + val_per_class].tolist()
    out.mkdir(parents=True)
    for split, indices in picks.items():
        with wds.TarWriter(str(out / f"{split}.tar"), encoder=False) as sink:
            for i in rng.permutation(indices):
                sink.write({"__key__": f"digit{i:05d}", "png": encode_png(images[i]),
                            "cls": str(digits.target[i]).encode()})
    return str(out / "train.tar"), str(out / "val.tar")


def run(train: str, val: str, out: Path, seed: int, epochs: int, options: tuple[str, ...]) -> float:
    cmd = [sys.executable, "-m", "dist_train", "train", "--config", str(CONFIG), f"data.train={train}",
           f"data.val={val}", "data.num_classes=10", f"train.output_dir={out}", f"train.seed={seed}",
           f"train.epochs={epochs}", "data.num_workers=0", "tracking.wandb=false", "tracking.plots=false",
           "train.progress_bar=false", "train.checkpoint_every_epoch=false", *options]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{done.stderr[-3000:]}")
    last = json.loads((out / "last" / "meta.json").read_text())["metrics"]
    return last["val_ema/acc" if "val_ema/acc" in last else "val/acc"]


def seeds_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark over seeds of the few-digits split."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--json", help="also write the figures here")
    return parser


def main() -> int:
    parser = seeds_parser(__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="*", help="only the variants whose names contain one of these")
    args = parser.parse_args()
    started = time.perf_counter()
    chosen = {name: options for name, options in VARIANTS.items()
              if not args.variants or name.startswith("baseline") or any(v in name for v in args.variants)}
    scores: dict[str, list[float]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            train, val = write_subset(Path(tmp) / f"data-{seed}", seed, args.train_per_class, 50)
            for i, (name, options) in enumerate(chosen.items()):
                scores[name].append(run(train, val, Path(tmp) / f"run-{seed}-{i}", seed, args.epochs, options))
                print(f"seed {seed}: {name}: {scores[name][-1]:.4f}", flush=True)
    report(scores, "baseline (digits_cpu.yaml)", args, started)
    return 0


def report(scores: dict[str, list[float]], reference: str, args, started: float, rows: str = "variant",
           versus: str = "vs baseline") -> None:
    """The table of accuracies over the seeds, each row against `reference`'s mean; the JSON."""
    base = statistics.mean(scores[reference])
    print(f"\n{args.train_per_class} training images per class, 500 validation images, {args.epochs} epochs, "
          f"{args.seeds} seeds ({time.perf_counter() - started:.0f} s)\n")
    print(f"| {rows} | val accuracy, mean | std | min | max | {versus} |\n| --- | --- | --- | --- | --- | --- |")
    for name, values in scores.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.4f} | {spread:.4f} | {min(values):.4f} | {max(values):.4f} "
              f"| {statistics.mean(values) - base:+.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"epochs": args.epochs, "train_per_class": args.train_per_class,
                                               "scores": scores}, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
