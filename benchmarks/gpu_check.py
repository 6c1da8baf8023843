"""A short GPU check: a torchvision model (ResNet-50) in bf16 on synthetic shards, one device.

Runs dist-train's own pieces (shard writer, streaming pipeline, accelerator set-up,
`engine.optimizer_step`, the step `fit` takes, through timing.fit_steps) for a fixed number of
optimizer steps and prints:
  - pipeline images/s: shards -> decode -> augment -> device -> forward/backward/step,
  - model images/s: the same step on one batch already on the device (the ceiling),
  - peak device memory.

    python benchmarks/gpu_check.py [--channels-last] [--decode-on-device]   # a GPU machine: the real check
    torchrun --nproc_per_node 8 benchmarks/gpu_check.py --model timm/vit_large_patch16_224 --parallel fsdp
    torchrun --nproc_per_node 8 benchmarks/gpu_check.py --model timm/vit_large_patch16_224 --parallel ddp
                                        # FSDP against DDP: peak memory per GPU and images/s
    python benchmarks/gpu_check.py --steps 2 --warmup 1 --batch-size 2 --image-size 32 --workers 0
                                                                    # a smoke test anywhere (CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: benchmarks/ is a package of the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.timing import fit_steps
from dist_train.config import Config
from dist_train.data import sources
from dist_train.data.order import OrderSpec
from dist_train.data.pipeline import TrainStreamSpec, device_stage, make_train_loader
from dist_train.data.resolve import resolve_shards
from dist_train.data.shard_writer import make_shards
from dist_train.recipe.models import create_model
from dist_train.recipe.optim import Schedule, build_optimizer
from dist_train.runtime.accelerator import make_accelerator
from dist_train.runtime.fsdp import shard_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help="model.kwargs as JSON, e.g. '{\"img_size\": 32}'")
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224, help="training crop; shards hold 256px JPEGs")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=max(0, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--channels-last", action="store_true", help="NHWC model (model.channels_last)")
    parser.add_argument("--decode-on-device", action="store_true",
                        help="JPEG decoded and augmented on the device (data.decode_on_device)")
    parser.add_argument("--data", help="shard directory to reuse (written there if missing)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                        help="train.parallel: fsdp shards the model over the processes (also over one: the code path)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = Config()
    cfg.model.name = args.model
    cfg.data.batch_size = args.batch_size
    cfg.data.image_size = args.image_size
    cfg.data.num_workers = args.workers
    cfg.data.augment = "standard"
    cfg.data.decode_on_device = args.decode_on_device
    cfg.train.mixed_precision = args.precision
    accelerator = make_accelerator(cfg.train)
    device = accelerator.device
    if args.parallel == "fsdp" and not torch.distributed.is_initialized():  # one process: a group of one
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                             init_method=f"tcp://127.0.0.1:{_free_port()}")
    window = max(1, min(5, args.steps))

    with tempfile.TemporaryDirectory() as tmp:
        shards = synthetic_shards(Path(args.data or tmp), args)
        model = create_model(args.model, 100, kwargs=args.model_kwargs)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        sharding = "no"
        if args.parallel == "fsdp":  # as start_run shards: blocks and root, then the optimizer
            sharding = shard_model(model.to(device), "fsdp", device, accelerator.num_processes,
                                   accelerator.num_processes, accelerator.mixed_precision)
        optimizer = build_optimizer(model, cfg.optim)
        schedule = Schedule(optimizer, cfg.sched, steps_per_epoch=args.warmup + args.steps, epochs=1)
        if args.parallel == "fsdp":
            optimizer = accelerator.prepare(optimizer)
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
        criterion = torch.nn.CrossEntropyLoss()
        order = OrderSpec(seed=0, global_batch=args.batch_size, partitions=1, window=cfg.data.shuffle_buffer)
        spec = TrainStreamSpec(shards, order, epoch=0, num_classes=100, batch_size=args.batch_size)
        stage = device_stage(cfg.data, device)  # CUDA: uint8 batches (or JPEG bytes), finished on the GPU
        loader = make_train_loader(spec, cfg.data, pin_memory=device.type == "cuda", for_device_stage=stage is not None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        records = fit_steps(model, loader, args.warmup + args.steps, optimizer, schedule, accelerator,
                                 log_every_steps=window, criterion=criterion, device_stage=stage)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed = [r["images_per_sec"] for r in records if r["step"] > args.warmup] or \
                [r["images_per_sec"] for r in records]
        pipeline_rate = statistics.median(timed)
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    model_rate = model_only_rate(model, optimizer, criterion, accelerator, args)
    figures = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": args.model,
        "precision": accelerator.mixed_precision,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "workers": args.workers,
        "channels_last": args.channels_last,
        "decode_on_device": args.decode_on_device,
        "processes": accelerator.num_processes,
        "sharding": sharding,
        "pipeline_images_per_sec": pipeline_rate,
        "model_images_per_sec": model_rate,
        "pipeline_over_model": pipeline_rate / model_rate,
        "peak_memory_gib": peak_gib,
        "torch": torch.__version__,
    }
    if not accelerator.is_main_process:  # under torchrun: one process reports (its own GPU's figures)
        return
    for name, value in figures.items():
        print(f"{name:26s} {value:.3f}" if isinstance(value, float) else f"{name:26s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


def synthetic_shards(directory: Path, args: argparse.Namespace):
    """Enough 256px JPEGs (for a 224 crop) for warmup + timed steps, written once per directory."""
    total = (args.warmup + args.steps) * args.batch_size
    if not (directory / "dataset.json").exists():
        started = time.perf_counter()
        stored = max(args.image_size, round(args.image_size * 256 / 224))
        make_shards(sources.synthetic(total, 100, stored, seed=0), directory, val_fraction=0.0, shard_size=1024)
        print(f"wrote {total} synthetic {stored}px JPEGs in {time.perf_counter() - started:.1f}s")
    shards = resolve_shards(str(directory), "train", 100)
    if shards.samples < total:
        raise SystemExit(f"{directory} holds {shards.samples} samples; this run needs {total}")
    return shards


def model_only_rate(model, optimizer, criterion, accelerator, args) -> float:
    """Images/s of forward+backward+step on one batch that never leaves the device."""
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=accelerator.device)
    labels = torch.randint(0, 100, (args.batch_size,), device=accelerator.device)
    model.train()

    def step() -> None:
        loss = criterion(model(images), labels)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(max(1, args.warmup // 2)):
        step()
    sync = torch.cuda.synchronize if accelerator.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return args.steps * args.batch_size / (time.perf_counter() - started)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
