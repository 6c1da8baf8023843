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
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn

from dist_train import __version__, workers
from dist_train.accelerate_costs import look_up_optional_packages_once
from dist_train.checkpoint import save_model_checkpoint
from dist_train.config import METRIC_NAMES, Config, TrainConfig, save_config, to_dict
from dist_train.data import Datasets, resolve_datasets
from dist_train.data.index import resolve_shards
from dist_train.data.order import OrderSpec, steps_per_epoch
from dist_train.data.pipeline import StreamSpec, TrainStreamSpec, make_loader, make_train_loader
from dist_train.errors import ConfigError, DataError
from dist_train.host_memory import keep_freed_memory
from dist_train.losses import build_loss
from dist_train.metrics import ValidationMetrics
from dist_train.models import create_model
from dist_train.optim import Schedule, build_optimizer
from dist_train.preemption import StopRequest, TrainingStopped
from dist_train.progress import TrainProgress
from dist_train.report import write_report
from dist_train.resume import (
    BestSoFar,
    TrainPosition,
    find_resumable,
    load_resumable,
    restore_rng,
    save_resumable,
    verify,
)
from dist_train.tracking import RunTracker, is_better, read_metrics, truncate_metrics


def train_one_epoch(model, batches, criterion, optimizer, schedule, accelerator, progress, clip_grad_norm=None,
                    pause_after_step=lambda: False) -> bool:
    """Train on this rank's batches of the epoch. Returns False when `pause_after_step()` asks
    to stop after an optimizer step (to checkpoint); call again with the same iterator to go on."""
    model.train()
    for images, labels in batches:
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
            if pause_after_step():
                return False
    return True


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
    """Train `cfg.train.epochs` epochs, validating after each; keep the best and the last model.

    With `train.resume`, continue from a resumable checkpoint; on SIGTERM or SIGUSR1, save
    one at the next step boundary and raise `TrainingStopped`.
    """
    datasets = datasets or resolve_datasets(cfg.data)
    workers.start_helpers(fork_server=cfg.data.num_workers > 0)  # already started by `dist-train train`
    accelerator = make_accelerator(cfg.train)
    out = Path(cfg.train.output_dir)
    resume_from = find_resume_checkpoint(cfg.train.resume, out)
    prepare_run_dir(cfg, out, accelerator, resuming=resume_from is not None)
    set_seed(cfg.train.seed)  # the same on every rank: DDP also broadcasts rank 0's weights
    resumed = load_resumable(resume_from, accelerator.process_index) if resume_from else None

    world, batch = accelerator.num_processes, cfg.data.batch_size
    order = resumed.order if resumed else OrderSpec(
        seed=cfg.train.seed, global_batch=world * cfg.train.grad_accum_steps * batch, partitions=world,
        window=cfg.data.shuffle_buffer,
    )
    accum = accumulation_for(order.global_batch, world, batch, cfg.train.grad_accum_steps, accelerator)
    steps = steps_per_epoch(datasets.train.samples, order.global_batch)
    if steps == 0:
        raise DataError(
            f"the training set has {datasets.train.samples} samples, fewer than one global batch "
            f"({world} processes x {accum} accumulation steps x {batch} = {order.global_batch})"
        )
    model = create_model(cfg.model.name, datasets.num_classes, cfg.data.channels)
    if cfg.model.sync_batchnorm and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # inputs follow the weights' layout
    optimizer = build_optimizer(model, cfg.optim, global_batch=order.global_batch)
    # The schedule is ours, stepped once per optimizer step, not passed to prepare():
    # accelerate would step it once per process.
    schedule = Schedule(optimizer, cfg.sched, steps, cfg.train.epochs)
    if resumed:
        model.load_state_dict(resumed.model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed:
        restore_training_state(resumed, optimizer, schedule, accelerator, out)
    criterion = build_loss(cfg.loss).to(accelerator.device)
    metrics = ValidationMetrics(datasets.num_classes, accelerator.device)
    tracker = RunTracker(accelerator, cfg, out, datasets.class_names)
    stop = StopRequest(accelerator)
    position = resumed.position if resumed else TrainPosition()
    best = resumed.best if resumed else BestSoFar()

    def checkpoint(position: TrainPosition) -> None:
        save_resumable(accelerator, out, position, order, best, model, optimizer, schedule, cfg.train.keep_checkpoints)

    def pause_after_step() -> bool:
        every = cfg.train.checkpoint_every_steps
        due = bool(every) and progress.step % every == 0 and progress.step % steps != 0
        return due or stop.requested()

    def stop_if_requested(position: TrainPosition) -> None:
        if stop.requested():
            accelerator.end_training()
            raise TrainingStopped(f"stopped by signal {stop.received} after step {position.global_step}; "
                                  f"resume with train.resume=auto (train.output_dir={out})")

    pin = accelerator.device.type == "cuda"
    started = time.perf_counter()
    accelerator.print(
        f"dist-train {__version__}: {world} process(es) on {accelerator.device.type} "
        f"({accelerator.distributed_type.value}), mixed precision {accelerator.mixed_precision}; "
        f"{datasets.train.samples} train / {datasets.val.samples} val samples, "
        f"{steps} steps per epoch of {order.global_batch} images"
        + (f"; resuming from {resume_from} at epoch {position.epoch}, step {position.global_step}" if resumed else "")
    )
    report_damage(accelerator, datasets)
    train_loader = make_train_loader(TrainStreamSpec(
        shards=datasets.train, order=order, epoch=position.epoch, num_classes=datasets.num_classes, batch_size=batch,
        grad_accum_steps=accum, rank=accelerator.process_index, world_size=world,
    ), cfg.data, pin)
    for epoch in range(position.epoch, cfg.train.epochs):
        train_loader.set_position(epoch, position.step_in_epoch)
        batches = iter(train_loader)
        progress = TrainProgress(accelerator, epoch, first_step=position.global_step,
                                 total_batches=(steps - position.step_in_epoch) * accum,
                                 log_every_steps=cfg.train.log_every_steps, show_bar=cfg.train.progress_bar)
        while not train_one_epoch(model, batches, criterion, optimizer, schedule, accelerator, progress,
                                  cfg.train.clip_grad_norm, pause_after_step):
            for record in progress.drain():
                tracker.log(record)
            position = TrainPosition(epoch, progress.step - epoch * steps, progress.step)
            checkpoint(position)
            stop_if_requested(position)
        epoch_stats = progress.close()
        for record in progress.drain():
            tracker.log(record)

        val_spec = StreamSpec(datasets.val, batch_size=cfg.data.val_batch_size or batch,
                              num_classes=datasets.num_classes, rank=accelerator.process_index, world_size=world)
        val_loader = make_loader(val_spec, cfg.data, pin)
        share_main_buffers(model, accelerator)
        values, confusion = evaluate(accelerator.unwrap_model(model), val_loader, metrics, accelerator)
        schedule.after_validation(values)
        step = (epoch + 1) * steps
        damage = damage_record(cfg, accelerator, datasets, train_loader, val_loader)
        tracker.log({"epoch": epoch, "step": step, **values, "val/confusion_matrix": confusion, **epoch_stats,
                     **damage})
        accelerator.print(
            f"epoch {epoch}: train loss {epoch_stats['train/epoch_loss']:.4f} | val "
            + "  ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in values.items())
            + f" | {epoch_stats['train/images_per_sec']:.0f} img/s"
            + (f" | skipped {damage['data/skipped_samples']} damaged samples" if damage else "")
        )
        if is_better(values[cfg.train.monitor], best.value, cfg.train.monitor_mode):
            best = BestSoFar(values[cfg.train.monitor], epoch, values)
            if accelerator.is_main_process:
                meta = checkpoint_meta(cfg, datasets, accelerator, epoch, step, values, confusion)
                save_model_checkpoint(out / "best", accelerator.get_state_dict(model), meta)
        # No rank goes on (or reads best/) while the main process may still be writing it.
        accelerator.wait_for_everyone()
        position = TrainPosition(epoch + 1, 0, step)
        if cfg.train.checkpoint_every_epoch or stop.requested():
            checkpoint(position)
        stop_if_requested(position)

    if accelerator.is_main_process:
        last = read_metrics(out / "metrics.jsonl")[-1]
        meta = checkpoint_meta(cfg, datasets, accelerator, cfg.train.epochs - 1, position.global_step,
                               {k: v for k, v in last.items() if k in METRIC_NAMES}, last["val/confusion_matrix"])
        save_model_checkpoint(out / "last", accelerator.get_state_dict(model), meta)
        if cfg.tracking.plots:
            write_plots_and_summary(out)
    accelerator.wait_for_everyone()
    stop.restore()
    accelerator.print(
        f"best {cfg.train.monitor} {best.value:.4f} at epoch {best.epoch}; "
        f"{time.perf_counter() - started:.1f}s; checkpoints in {out}/best and {out}/last"
    )
    accelerator.end_training()  # also closes the wandb run
    return FitResult(best.metrics or {}, best.epoch, out)


def find_resume_checkpoint(resume: str | None, out: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return find_resumable(out)
    path = Path(resume)
    verify(path)  # a named checkpoint must be good: no silent fallback
    return path


def accumulation_for(global_batch: int, world: int, batch: int, configured: int, accelerator: Accelerator) -> int:
    """Accumulation steps that keep the run's global batch on this many processes."""
    accum, rest = divmod(global_batch, world * batch)
    if rest or accum == 0:
        raise ConfigError(
            f"cannot keep the run's global batch of {global_batch} on {world} processes with data.batch_size="
            f"{batch}: choose data.batch_size so that processes x accumulation x batch_size = {global_batch}"
        )
    if accum != configured:
        accelerator.print(f"train.grad_accum_steps {configured} -> {accum}: keeps the global batch of "
                          f"{global_batch} on {world} process(es)")
    accelerator.gradient_accumulation_steps = accum
    return accum


def restore_training_state(resumed, optimizer, schedule, accelerator: Accelerator, out: Path) -> None:
    optimizer.load_state_dict(resumed.optimizer)
    schedule.load_state_dict(resumed.scheduler)
    if resumed.scaler and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed.scaler)
    if resumed.rng and resumed.world_size == accelerator.num_processes:
        restore_rng(resumed.rng)
    if accelerator.is_main_process:
        truncate_metrics(out / "metrics.jsonl", resumed.position.global_step)
    accelerator.wait_for_everyone()


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
    spec = StreamSpec(shards, num_classes=num_classes,
                      batch_size=batch_size or cfg.data.val_batch_size or cfg.data.batch_size,
                      rank=accelerator.process_index, world_size=accelerator.num_processes)
    metrics = ValidationMetrics(num_classes, accelerator.device)
    model = loaded.model.to(accelerator.device)
    values, confusion = evaluate(model, make_loader(spec, cfg.data), metrics, accelerator)
    return values, confusion, shards.samples


def share_main_buffers(model, accelerator: Accelerator) -> None:
    """Copy the main process's buffers (BatchNorm statistics) to every rank before validation.

    DDP is told not to do this in every forward (`DDP_SETTINGS`), so the ranks' running
    statistics drift apart in training; here they become rank 0's, the ones it saves. Every
    rank takes part, also one without a validation batch (fewer samples than processes, or
    all of them damaged), and validation runs the unwrapped model, which has no collective
    inside: a collective in the first validation batch would hang such a rank's peers.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        torch.distributed.broadcast(buffer, src=0)


def write_plots_and_summary(out: Path) -> None:
    """The run's PNG plots and summary.md; a failure here must not fail a finished run."""
    try:
        write_report(out)
    except Exception as exc:
        warnings.warn(f"could not write plots and summary: {exc} (retry: dist-train report {out})", stacklevel=2)


# How DDP wraps the model (only used when there are several processes):
# - broadcast_buffers=False: by default DDP copies rank 0's buffers (BatchNorm statistics) to
#   every rank in each training forward, a collective per step that changes nothing we use.
#   In training mode BatchNorm normalizes with the batch's own statistics; rank 0's running
#   statistics follow its own batches either way; it alone saves checkpoints, and
#   `share_main_buffers` gives every rank its copy before validation. 2-process CPU DDP:
#   +4% images/s, DDP at 0.89 instead of 0.83 of two processes that do not communicate.
# - gradient_as_bucket_view=True: gradients live in DDP's all-reduce buckets instead of being
#   copied into them and back; one copy of the gradients less in memory.
DDP_SETTINGS = DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    forced_cpu = cfg.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    on_cpu = forced_cpu or not torch.cuda.is_available()
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if on_cpu and precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 is not supported on the CPU (accelerate would silently "
            "train in fp32); use bf16 or no"
        )
    look_up_optional_packages_once()  # accelerate would search sys.path on every optimizer step
    if on_cpu:
        keep_freed_memory()  # a CPU step would otherwise fault its activations back in every time
    # cpu=True matters even without a GPU: it makes a multi-process launch join one gloo
    # process group instead of running as independent single-process jobs.
    return Accelerator(cpu=on_cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                       kwargs_handlers=[DDP_SETTINGS])


def damage_record(cfg, accelerator: Accelerator, datasets: Datasets, train_loader, val_loader) -> dict[str, int]:
    """With data.on_error=skip, the damaged samples left out: those found while indexing (the
    same on every rank) plus those that failed to decode this epoch on any rank (collective)."""
    if cfg.data.on_error != "skip":
        return {}
    read_here = train_loader.stream.skipped.take() + val_loader.dataset.skipped.take()
    read = accelerator.reduce(torch.tensor([read_here], device=accelerator.device), "sum").item()
    return {"data/skipped_samples": datasets.skipped_samples + int(read)}


def report_damage(accelerator: Accelerator, datasets: Datasets, shown: int = 10) -> None:
    damage = datasets.damage
    if not damage:
        return
    accelerator.print(f"dist-train: data.on_error=skip: left out {datasets.skipped_samples} damaged "
                      f"samples ({len(damage)} problems):")
    for d in damage[:shown]:
        accelerator.print(f"  {d.where}: {d.problem}" + (f" ({d.samples} samples)" if d.samples > 1 else ""))
    if len(damage) > shown:
        accelerator.print(f"  ... and {len(damage) - shown} more")


def prepare_run_dir(cfg: Config, out: Path, accelerator: Accelerator, resuming: bool) -> None:
    if (out / "metrics.jsonl").exists() and not resuming and cfg.train.resume != "auto":
        raise ConfigError(
            f"train.output_dir {out} already holds a run (metrics.jsonl); choose another directory "
            "or continue it with train.resume=auto"
        )
    accelerator.wait_for_everyone()  # every rank has checked before the main process writes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if not resuming:  # a fresh start, also under resume=auto without a checkpoint yet
            (out / "metrics.jsonl").write_text("")
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
