"""The training loop: `train_one_epoch`, `evaluate`, and `fit`, which runs them epoch by epoch.

One CPU:                 dist-train train --config configs/digits_cpu.yaml
Processes of a machine:  accelerate launch --config_file launch/<name>.yaml -m dist_train train --config ...

The same code runs in every case; accelerate decides the device, the process group and the
mixed precision. Everything around the loop (data plan, metrics, checkpoints, records) lives
in its own module and is called from here.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from dist_train import __version__
from dist_train.checkpoint import save_model_checkpoint
from dist_train.config import Config, TrainConfig, save_config, to_dict
from dist_train.data import Datasets, resolve_datasets
from dist_train.data.index import resolve_shards
from dist_train.data.pipeline import StreamSpec, make_loader
from dist_train.data.plan import steps_per_epoch
from dist_train.errors import ConfigError, DataError
from dist_train.losses import build_loss
from dist_train.metrics import ValidationMetrics
from dist_train.models import create_model
from dist_train.optim import Schedule, build_optimizer
from dist_train.progress import TrainProgress
from dist_train.report import write_report
from dist_train.tracking import RunTracker, is_better


def train_one_epoch(model, loader, criterion, optimizer, schedule, accelerator, progress, clip_grad_norm=None) -> None:
    """One pass over this rank's batches of the epoch."""
    model.train()
    for images, labels in loader:
        images, labels = images.to(accelerator.device), labels.to(accelerator.device)
        # Inside `accumulate`, DDP skips the gradient all-reduce (no_sync) and the optimizer
        # skips step and zero_grad on every micro-batch but the last of each window.
        with accelerator.accumulate(model):
            outputs = model(images)
            loss = criterion(outputs, labels)
            accelerator.backward(loss)
            if clip_grad_norm and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        progress.batch_done(loss, len(labels), schedule.lr)
        if accelerator.sync_gradients:
            schedule.after_optimizer_step()
            progress.step_done(schedule.lr)


def evaluate(model, loader, metrics: ValidationMetrics, accelerator) -> tuple[dict[str, float], list[list[int]]]:
    """Metrics over this rank's share of the validation set, synced across all ranks."""
    model.eval()
    metrics.reset()
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(accelerator.device), labels.to(accelerator.device)
            with accelerator.autocast():
                outputs = model(images)
            metrics.update(outputs, labels)
    return metrics.compute()


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    best_epoch: int
    output_dir: Path


def fit(cfg: Config, datasets: Datasets | None = None) -> FitResult:
    """Train `cfg.train.epochs` epochs, validating after each; keep the best and the last model."""
    datasets = datasets or resolve_datasets(cfg.data)
    accelerator = make_accelerator(cfg.train)
    out = Path(cfg.train.output_dir)
    prepare_run_dir(cfg, out, accelerator)
    set_seed(cfg.train.seed)  # the same on every rank: DDP also broadcasts rank 0's weights

    world, accum, batch = accelerator.num_processes, cfg.train.grad_accum_steps, cfg.data.batch_size
    steps = steps_per_epoch(datasets.train.samples, world, accum, batch)
    if steps == 0:
        raise DataError(
            f"the training set has {datasets.train.samples} samples, fewer than one global batch "
            f"({world} processes x {accum} accumulation steps x {batch} = {world * accum * batch})"
        )
    model = create_model(cfg.model.name, datasets.num_classes, cfg.data.channels)
    if cfg.model.sync_batchnorm and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # inputs follow the weights' layout
    optimizer = build_optimizer(model, cfg.optim, global_batch=world * accum * batch)
    # The schedule is ours, stepped once per optimizer step, not passed to prepare():
    # accelerate would step it once per process.
    schedule = Schedule(optimizer, cfg.sched, steps, cfg.train.epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = build_loss(cfg.loss).to(accelerator.device)
    metrics = ValidationMetrics(datasets.num_classes, accelerator.device)
    tracker = RunTracker(accelerator, cfg, out, datasets.class_names)

    def stream(shards, train: bool, epoch: int = 0) -> StreamSpec:
        return StreamSpec(
            shards=shards, train=train, num_classes=datasets.num_classes,
            batch_size=batch if train else (cfg.data.val_batch_size or batch),
            seed=cfg.train.seed, epoch=epoch, rank=accelerator.process_index, world_size=world,
            grad_accum_steps=accum, shuffle_buffer=cfg.data.shuffle_buffer,
        )

    pin = accelerator.device.type == "cuda"
    best_value, best_metrics, best_epoch = None, {}, -1
    started = time.perf_counter()
    accelerator.print(
        f"dist-train {__version__}: {world} process(es) on {accelerator.device.type} "
        f"({accelerator.distributed_type.value}), mixed precision {accelerator.mixed_precision}; "
        f"{datasets.train.samples} train / {datasets.val.samples} val samples, "
        f"{steps} steps per epoch of {world * accum * batch} images"
    )
    for epoch in range(cfg.train.epochs):
        train_loader = make_loader(stream(datasets.train, True, epoch), cfg.data, pin)
        progress = TrainProgress(accelerator, epoch, first_step=epoch * steps, total_batches=steps * accum,
                                 log_every_steps=cfg.train.log_every_steps, show_bar=cfg.train.progress_bar)
        train_one_epoch(model, train_loader, criterion, optimizer, schedule, accelerator, progress,
                        cfg.train.clip_grad_norm)
        epoch_stats = progress.close()
        for record in progress.records:
            tracker.log(record)

        val_loader = make_loader(stream(datasets.val, False), cfg.data, pin)
        values, confusion = evaluate(model, val_loader, metrics, accelerator)
        schedule.after_validation(values)
        step = (epoch + 1) * steps
        tracker.log({"epoch": epoch, "step": step, **values, "val/confusion_matrix": confusion, **epoch_stats})
        accelerator.print(
            f"epoch {epoch}: train loss {epoch_stats['train/epoch_loss']:.4f} | val "
            + "  ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in values.items())
            + f" | {epoch_stats['train/images_per_sec']:.0f} img/s"
        )

        if is_better(values[cfg.train.monitor], best_value, cfg.train.monitor_mode):
            best_value, best_metrics, best_epoch = values[cfg.train.monitor], values, epoch
            if accelerator.is_main_process:
                meta = checkpoint_meta(cfg, datasets, accelerator, epoch, step, values, confusion)
                save_model_checkpoint(out / "best", accelerator.get_state_dict(model), meta)
        # No rank goes on (or reads best/) while the main process may still be writing it.
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        meta = checkpoint_meta(cfg, datasets, accelerator, cfg.train.epochs - 1, step, values, confusion)
        save_model_checkpoint(out / "last", accelerator.get_state_dict(model), meta)
        if cfg.tracking.plots:
            write_plots_and_summary(out)
    accelerator.wait_for_everyone()
    accelerator.print(
        f"best {cfg.train.monitor} {best_value:.4f} at epoch {best_epoch}; "
        f"{time.perf_counter() - started:.1f}s; checkpoints in {out}/best and {out}/last"
    )
    accelerator.end_training()  # also closes the wandb run
    return FitResult(best_metrics, best_epoch, out)


def evaluate_checkpoint(checkpoint: str | Path, data: str, split: str = "val", batch_size: int | None = None):
    """Metrics of a saved model on shards: (values, confusion, samples). Works in one process
    or under `accelerate launch`, where each rank evaluates its share and metrics are synced."""
    from dist_train.predict import load_for_inference

    loaded = load_for_inference(checkpoint)
    cfg, num_classes = loaded.cfg, len(loaded.class_names)
    # The precision the run validated with, so that the numbers reproduce.
    precision = loaded.meta.get("mixed_precision", "no")
    accelerator = make_accelerator(replace(cfg.train, mixed_precision=precision, grad_accum_steps=1))
    shards = resolve_shards(data, split, num_classes)
    spec = StreamSpec(shards, train=False, num_classes=num_classes,
                      batch_size=batch_size or cfg.data.val_batch_size or cfg.data.batch_size,
                      rank=accelerator.process_index, world_size=accelerator.num_processes)
    metrics = ValidationMetrics(num_classes, accelerator.device)
    model = loaded.model.to(accelerator.device)
    values, confusion = evaluate(model, make_loader(spec, cfg.data), metrics, accelerator)
    return values, confusion, shards.samples


def write_plots_and_summary(out: Path) -> None:
    """The run's PNG plots and summary.md; a failure here must not fail a finished run."""
    try:
        write_report(out)
    except Exception as exc:
        warnings.warn(f"could not write plots and summary: {exc} (retry: dist-train report {out})", stacklevel=2)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    forced_cpu = cfg.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    on_cpu = forced_cpu or not torch.cuda.is_available()
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if on_cpu and precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 is not supported on the CPU (accelerate would silently "
            "train in fp32); use bf16 or no"
        )
    # cpu=True matters even without a GPU: it makes a multi-process launch join one gloo
    # process group instead of running as independent single-process jobs.
    return Accelerator(cpu=on_cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum_steps)


def prepare_run_dir(cfg: Config, out: Path, accelerator: Accelerator) -> None:
    if (out / "metrics.jsonl").exists():
        raise ConfigError(
            f"train.output_dir {out} already holds a run (metrics.jsonl); choose another directory"
        )
    accelerator.wait_for_everyone()  # every rank has checked before the main process writes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "metrics.jsonl").touch()
    accelerator.wait_for_everyone()


def checkpoint_meta(cfg, datasets, accelerator, epoch, step, values, confusion) -> dict:
    return {
        "dist_train_version": __version__,
        "mixed_precision": accelerator.mixed_precision,
        "world_size": accelerator.num_processes,
        "epoch": epoch,
        "step": step,
        "metrics": values,
        "monitor": cfg.train.monitor,
        "confusion_matrix": confusion,
        "class_names": datasets.class_names,
        "num_classes": datasets.num_classes,
        "config": to_dict(cfg),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
