"""The training loop: `train_step`, `evaluate`, `validate`, and `fit`, which runs them.

One CPU:                 dist-train train --config configs/digits_cpu.yaml
Processes of a machine:  accelerate launch --config_file launch/<name>.yaml -m dist_train train --config ...

The same code runs in every case; accelerate decides the device, the process group and the
mixed precision. The loop counts optimizer steps; after each one, `due_after_step` decides
in one place whether to log, validate, checkpoint or stop. Everything around the loop (set-up
and resume, data, metrics, checkpoints, records) lives in its own module: run.py builds
it all, the training state (state.py) holds what a resume restores, and best.py decides which
validations count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dist_train.config import EMA_PREFIX, Config, TrainConfig
from dist_train.data.datasets import Datasets
from dist_train.recipe.models import logits_of
from dist_train.runtime.accelerator import share_main_buffers
from dist_train.runtime.progress_lines import Progress
from dist_train.training.progress import epoch_line
from dist_train.training.run import FitResult, Run, start_run

if TYPE_CHECKING:
    from dist_train.recipe.metrics import ValidationMetrics


def train_step(model, micro_batches, criterion, optimizer, accelerator, progress, clip_grad_norm=None,
               mix=None, frozen=(), device_stage=None, seed_forward=None, teacher=None) -> None:
    """One optimizer step over this rank's micro-batches of it. `frozen`: parameters that do not
    train at this step (model.freeze): their gradients are dropped before clipping and the step.
    `seed_forward(micro)`: seeds the micro-batch's dropout and drop path (runtime/seeds.py).
    `device_stage`: what finishes a batch on the device (CUDA's uint8 batches normalized there;
    data.decode_on_device's JPEG bytes decoded and augmented there: data/pipeline.py).
    `teacher`: knowledge distillation, the teacher's logits of the same images blended into the
    loss (recipe/distill.py)."""
    model.train()
    for micro, (images, labels) in enumerate(micro_batches):
        images = images.to(accelerator.device, non_blocking=True)  # from pinned memory on CUDA
        labels = labels.to(accelerator.device, non_blocking=True)
        if device_stage is not None:
            images = device_stage(images)
        if mix is not None:  # mixup / cutmix: images blended in pairs, labels become soft targets
            images, labels = mix(images, labels, micro)
        if seed_forward is not None:  # dropout / drop path masks: a function of the micro-batch, not the rank
            seed_forward(micro)
        # Inside `accumulate`, DDP skips the gradient all-reduce (no_sync) and the optimizer
        # skips step and zero_grad on every micro-batch but the last of the step.
        with accelerator.accumulate(model):
            outputs = model(images)
            loss = criterion(outputs, labels)
            if teacher is not None:  # frozen, outside DDP: no gradient of its own, no all-reduce
                loss = teacher.loss(loss, outputs, images, accelerator)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                for param in frozen:
                    param.grad = None  # the optimizer skips a parameter without a gradient
                if clip_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        progress.batch_done(loss, len(labels))


def evaluate(model, loader, metrics: ValidationMetrics, accelerator, device_stage=None, tta: str = "none",
             on_batch=None) -> tuple[dict[str, float], list | dict]:
    """Metrics over this rank's share of the validation set, synced across all ranks.
    `tta="flip"`: of the mean logits of each image and its mirror (data.tta). `on_batch(n)`:
    told the size of each batch done (the eval command's progress)."""
    model.eval()
    metrics.reset()
    with torch.no_grad():
        for images, labels in loader:
            images = images.to(accelerator.device, non_blocking=True)
            labels = labels.to(accelerator.device, non_blocking=True)
            if device_stage is not None:  # see train_step
                images = device_stage(images)
            with accelerator.autocast():
                outputs = logits_of(model, images, tta)
            metrics.update(outputs, labels)
            if on_batch is not None:
                on_batch(len(labels))
    return metrics.compute()


def optimizer_step(run: Run, micro_batches) -> None:
    """One optimizer step of the run (`train_step`) and what follows every one: the step
    counter, the LR schedule, the weights' moving average and the progress. `fit` and
    `dist-train bench` both call it, so the bench times the product's own step."""
    state = run.state
    train_step(state.model, micro_batches, run.criterion, state.optimizer, run.accelerator, run.progress,
               run.cfg.train.clip_grad_norm, run.mixer.at_step(state.step) if run.mixer else None,
               run.frozen_at(state.step), run.device_stage, run.forward_seeds.at_step(state.step), run.teacher)
    state.step += 1
    state.schedule.after_optimizer_step()
    if state.ema and state.ema.due(state.step):  # every rank alike, from identical weights: no collective
        state.ema.update(state.bare_model)
    run.progress.step_done(state.schedule.lr)


@dataclass(frozen=True)
class Due:
    log: bool
    validate: bool
    checkpoint: bool
    stop: bool


def due_after_step(step: int, cfg: TrainConfig, steps_per_epoch: int, stop_requested: bool) -> Due:
    """What the run does after optimizer step `step` (counted from 1), in this order."""
    epoch_end = step % steps_per_epoch == 0
    every = cfg.checkpoint_every_steps
    return Due(
        log=step % cfg.log_every_steps == 0,
        validate=epoch_end or bool(cfg.val_every_steps and step % cfg.val_every_steps == 0),
        checkpoint=stop_requested or (epoch_end and cfg.checkpoint_every_epoch)
        or bool(every and step % every == 0 and not epoch_end),
        stop=stop_requested,
    )


def fit(cfg: Config, datasets: Datasets | None = None) -> FitResult:
    """Train `cfg.train.epochs` epochs, validating after each; keep the best and the last model.

    With `train.resume`, continue from a resumable checkpoint; on SIGTERM or SIGUSR1, save
    one after the current step and raise `TrainingStopped`. With `train.early_stop_patience`,
    end early once the monitor has stopped improving.
    """
    run = start_run(cfg, datasets)
    state = run.state
    for micro_batches in run.step_batches():
        optimizer_step(run, micro_batches)

        due = due_after_step(state.step, cfg.train, run.layout.steps_per_epoch, run.stop.requested())
        if due.log:
            run.tracker.log(run.train_record())
        if due.validate:
            validate(run)
        if due.checkpoint:
            run.save_checkpoint()
        if due.stop:
            run.stop_now()
        if due.validate and run.stopped_improving():
            break
    return run.finish()


def validate(run: Run) -> None:
    """Validate on every rank, log the record, keep the best model in RUN/best."""
    state, accelerator, monitor = run.state, run.accelerator, run.cfg.train.monitor
    # At an epoch's end, the epoch's training figures (timed before validation); mid-epoch
    # (train.val_every_steps) the epoch goes on.
    epoch_stats = (run.progress.end_epoch() | run.size_record()) if state.step_in_epoch == 0 else {}
    val_loader = run.val_loader()
    share_main_buffers(state.model, accelerator)
    model = state.full_model()  # uncompiled (see train.compile); under FSDP gathered whole
    # `confusion`: the confusion matrix, or with multi-label data the per-label scores.
    values, confusion = _evaluate_shown(run, model, val_loader, "validation")
    if state.ema:  # the moving average too, as val_ema/*; its confusion matrix if it is monitored
        ema_values, ema_confusion = _evaluate_shown(run, state.ema.module_with_buffers_of(model), val_loader,
                                                    "validation (EMA)")
        values |= {EMA_PREFIX + k.removeprefix("val/"): v for k, v in ema_values.items()}
        confusion = ema_confusion if monitor.startswith(EMA_PREFIX) else confusion
    state.schedule.after_validation(values)
    epoch = state.epoch_of_last_step
    record = {"epoch": epoch, "step": state.step, **values, run.metrics.detail_key: confusion,
              **epoch_stats, **run.damage_since_last(val_loader)}
    run.tracker.log(record)
    run.last_validation = record
    accelerator.print(epoch_line(record))
    verdict = state.best.judge(values[monitor], epoch, values, state.step, run.cfg.train.monitor_mode,
                               run.cfg.train.keep_best)
    if verdict.best:
        run.save_model("best", epoch, values, confusion)
    run.keep_top(verdict, epoch, values, confusion)


def _evaluate_shown(run: Run, model, loader, what: str) -> tuple[dict[str, float], list | dict]:
    """`evaluate` with the run's options, its progress shown as the eval command's is: a bar on a
    terminal, else a line every few seconds (none for a validation shorter than that)."""
    accelerator = run.accelerator
    progress = Progress(what, run.datasets.val.samples,
                        enabled=accelerator.is_main_process and run.cfg.train.progress_bar)
    try:
        # The main process's share counted for all: the ranks' shares are of one size within a batch.
        with run.times("validation"):
            return evaluate(model, loader, run.metrics, accelerator, run.device_stage, run.cfg.data.tta,
                            on_batch=lambda n: progress.advance(n * accelerator.num_processes))
    finally:
        progress.close()
