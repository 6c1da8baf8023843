"""Everything the loop needs, set up (and resumed) before its first step; what a run does
after its last. The loop itself is dist_train/training/engine.py.

    run = start_run(cfg, datasets)   # accelerator, data, model, optimizer, state, records
    for micro_batches in run.step_batches(): ...
    run.finish()
"""

from __future__ import annotations

import functools
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from dist_train import __version__
from dist_train.checkpoint import load_resumable, save_model_checkpoint, save_resumable, saved_config, saved_meta
from dist_train.checkpoint.background import CheckpointWriter
from dist_train.config import (
    ALL_EMA_METRIC_NAMES,
    ALL_METRIC_NAMES,
    EMA_PREFIX,
    Config,
    check_metrics_measured,
    to_dict,
)
from dist_train.data import workers
from dist_train.data.damage import damage_record, report_damage
from dist_train.data.datasets import Datasets, cache_if_remote, resolve_datasets, train_class_counts
from dist_train.data.order import OrderSpec
from dist_train.data.pipeline import EvalStreamSpec, TrainLoader, TrainStreamSpec, device_stage, make_eval_loader
from dist_train.data.resolution import ResolutionSchedule, resolution_schedule
from dist_train.data.sampling import epoch_sampler
from dist_train.recipe.distill import Teacher, check_teacher_unchanged, load_teacher
from dist_train.recipe.ema import WeightsEma, ema_decay_per_update
from dist_train.recipe.losses import build_loss
from dist_train.recipe.mixing import BatchMixer, make_mixer
from dist_train.recipe.models import model_from_config
from dist_train.recipe.optim import Schedule, build_optimizer, head_prefix
from dist_train.recipe.pretrained import load_pretrained, weights_path
from dist_train.runtime import startup_clock
from dist_train.runtime.accelerator import make_accelerator
from dist_train.runtime.fsdp import shard_for_training
from dist_train.runtime.preemption import StopRequest, TrainingStopped
from dist_train.runtime.run_times import RunTimes
from dist_train.runtime.seeds import ForwardSeeds
from dist_train.training.batch_layout import RunLayout, plan_layout
from dist_train.training.best import Verdict
from dist_train.training.progress import TrainProgress
from dist_train.training.resume_config import changes_what_follows, check_resume_config
from dist_train.training.run_dir import find_resume_checkpoint, prepare_run_dir, unlock_run_dir, write_plots_and_summary
from dist_train.training.state import TrainState
from dist_train.training.tracking import RunTracker, read_metrics, truncate_metrics

if TYPE_CHECKING:
    from dist_train.recipe.metrics import ValidationMetrics

TOP_DIR = "top"  # RUN/top/step-N: the train.keep_best best model checkpoints


@dataclass
class FitResult:
    best_metrics: dict[str, float]
    best_epoch: int
    output_dir: Path
    # The trained network (its last weights, unwrapped from DDP and torch.compile): RUN/best
    # holds the best ones, `load_for_inference(RUN / "best")` reads them back.
    model: nn.Module | None = None


@dataclass
class Run:
    cfg: Config
    accelerator: Accelerator
    out: Path
    datasets: Datasets
    layout: RunLayout
    state: TrainState
    criterion: nn.Module
    train_loader: TrainLoader
    tracker: RunTracker
    progress: TrainProgress
    stop: StopRequest
    times: RunTimes  # where the run's time goes, printed at its end
    last_validation: dict[str, Any]  # the newest validation record ({} before the first)
    forward_seeds: ForwardSeeds  # dropout and drop path seeded per micro-batch (runtime/seeds.py)
    mixer: BatchMixer | None = None  # mixup / cutmix (data.mixup_alpha, data.cutmix_alpha)
    resolution: ResolutionSchedule | None = None  # progressive resizing: the training loader's schedule
    # What finishes batches on the device: CUDA's uint8 ones normalized, data.decode_on_device's
    # JPEG bytes decoded and augmented (data/pipeline.py); None: the workers did it all.
    device_stage: Callable | None = None
    pretrained: dict[str, Any] | None = None  # what model.weights loaded, at this launch
    teacher: Teacher | None = None  # knowledge distillation (distill.teacher)
    _metrics: ValidationMetrics | None = None
    # Resumable checkpoints written beside training (checkpoint/background.py).
    checkpoint_writer: CheckpointWriter = field(default_factory=CheckpointWriter)

    @property
    def metrics(self) -> ValidationMetrics:
        """The validation metrics, built at their first use: torchmetrics takes over a second
        to import, which the first optimizer step need not wait for."""
        if self._metrics is None:
            from dist_train.recipe.metrics import validation_metrics

            self._metrics = validation_metrics(self.cfg, self.datasets.num_classes, self.accelerator.device)
        return self._metrics

    def step_batches(self) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """This rank's micro-batches of each optimizer step left, epoch after epoch, from the
        state's step on. Each epoch starts the loader at its position and the epoch's progress."""
        steps, accum = self.layout.steps_per_epoch, self.layout.grad_accum_steps
        start_epoch, start_in_epoch = self.state.epoch, self.state.step_in_epoch
        if self.stopped_improving():  # resumed from the checkpoint of a run that ended early
            return
        for epoch in range(start_epoch, self.layout.epochs):
            first = start_in_epoch if epoch == start_epoch else 0
            self.train_loader.set_position(epoch, first)
            batches = iter(self.train_loader)
            self.progress.start_epoch(epoch, steps - first, steps)  # timed from here: workers are up
            for step in range(first, steps):
                yield islice(batches, accum)
                if step == first and epoch == start_epoch:  # the first optimizer step is done
                    self.times.first_step_done()
                    startup_clock.mark("first step (workers, first batches)")
                    startup_clock.report(self.accelerator.print)
            if next(batches, None) is not None:  # also ends the loader's iteration cleanly
                raise RuntimeError(f"the training loader gave more than {steps} steps in epoch {epoch}")

    def keep_top(self, verdict: Verdict, epoch: int, values: dict[str, float],
                 confusion: list[list[int]] | None) -> None:
        """RUN/top/step-N as `BestSoFar.judge` decided (collective when this validation is among
        them): this one written, those pushed out (or that a resumed run no longer counts) gone."""
        if self.cfg.train.keep_best < 2:
            return
        if verdict.in_top:
            self.save_model(f"{TOP_DIR}/step-{self.state.step:08d}", epoch, values, confusion)
        if self.accelerator.is_main_process:
            kept = {f"step-{step:08d}" for step in verdict.top_steps}
            for path in (self.out / TOP_DIR).glob("step-*"):
                if path.name not in kept:
                    shutil.rmtree(path, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    @property
    def monitors_ema(self) -> bool:
        return self.cfg.train.monitor.startswith(EMA_PREFIX)

    def train_record(self) -> dict[str, Any]:
        """The train record of the steps since the last one (collective), with the training
        crop size in force when progressive resizing changes it."""
        state = self.state
        record = self.progress.train_record(state.epoch_of_last_step, state.step, state.schedule.lr)
        return record | self.size_record()

    def size_record(self) -> dict[str, int]:
        """{"train/image_size": the crop of the last step} with progressive resizing, else {}."""
        if self.resolution is None:
            return {}
        last = max(self.state.step - 1, 0)
        return {"train/image_size": self.resolution.size_of_step(last, self.layout.steps_per_epoch)}

    def frozen_at(self, step: int) -> list[nn.Parameter]:
        """The parameters model.freeze holds still at optimizer step `step` (a pure function of
        the step: a resume freezes and unfreezes exactly where an uninterrupted run does)."""
        epochs = self.cfg.model.freeze_epochs
        if self.cfg.model.freeze == "none":
            return []
        if epochs is not None and step >= round(epochs * self.layout.steps_per_epoch):
            return []
        return self._backbone

    @functools.cached_property
    def _backbone(self) -> list[nn.Parameter]:
        """Every parameter but the head's: found once, not at every step."""
        head = head_prefix(self.state.bare_model)
        return [p for name, p in self.state.bare_model.named_parameters() if not name.startswith(head)]

    def stopped_improving(self) -> bool:
        """True once `train.early_stop_patience` validations in a row have not improved the monitor."""
        return self.state.best.stopped_improving(self.cfg.train.early_stop_patience)

    def val_loader(self) -> torch.utils.data.DataLoader:
        spec = EvalStreamSpec(self.datasets.val, batch_size=self.cfg.data.val_batch_size or self.cfg.data.batch_size,
                              num_classes=self.datasets.num_classes, rank=self.accelerator.process_index,
                              world_size=self.accelerator.num_processes,
                              keep_cached=tuple(s.url for s in self.datasets.train.shards if s.remote))
        cuda = self.accelerator.device.type == "cuda"
        return make_eval_loader(spec, self.cfg.data, pin_memory=cuda, for_device_stage=self.device_stage is not None)

    def damage_since_last(self, val_loader) -> dict[str, int]:
        return damage_record(self.cfg.data.on_error, self.accelerator, self.datasets, self.train_loader.stream,
                             val_loader.dataset)

    def meta(self, epoch: int, values: dict[str, float], confusion: list[list[int]] | None) -> dict[str, Any]:
        """A model checkpoint's meta.json: what inference needs, and how the run ran."""
        return {
            "dist_train_version": __version__,
            "mixed_precision": self.accelerator.mixed_precision,
            "world_size": self.accelerator.num_processes,
            "layout": asdict(self.layout),
            "launches": self.state.launches.history,
            # What model.weights loaded (a resumed launch took its weights from the checkpoint).
            "pretrained": self.pretrained or ({"source": self.cfg.model.weights, "loaded": "at the first launch"}
                                               if self.cfg.model.weights else None),
            "distill": self.teacher.meta if self.teacher else None,  # the teacher: source, file, SHA-256
            "stopped_early": self.stopped_improving(),
            "epoch": epoch,
            "step": self.state.step,
            "metrics": values,
            "monitor": self.cfg.train.monitor,
            self.metrics.detail_key.removeprefix("val/"): confusion,  # confusion_matrix, or per_label
            "class_counts": {"train": list(self.datasets.train.class_counts or []),
                             "val": list(self.datasets.val.class_counts or [])},
            "task": self.cfg.data.task,
            "class_names": self.datasets.class_names,
            "num_classes": self.datasets.num_classes,
            "config": to_dict(self.cfg),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def save_model(self, name: str, epoch: int, values: dict[str, float], confusion: list[list[int]] | None) -> None:
        """RUN/best, RUN/top/step-N or RUN/last, by the main process; the others wait until it
        is complete. best/ and top/ hold what the monitor measured: the moving average's weights
        when `train.monitor` is one of its metrics (meta.json `weights`)."""
        ema = name != "last" and self.monitors_ema
        model = self.state.full_model()  # under FSDP gathered: every rank calls save_model
        state_dict = (self.state.ema.module_with_buffers_of(model) if ema else model).state_dict()
        with self.times("models"):
            if self.accelerator.is_main_process:
                meta = {**self.meta(epoch, values, confusion), "weights": "ema" if ema else "model"}
                save_model_checkpoint(self.out / name, state_dict, meta)
            self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> None:
        """A resumable checkpoint of this step (collective); never of a run whose loss went NaN."""
        self.progress.check_finite(self.state.step)
        last = self.last_validation
        meta = self.meta(self.state.epoch_of_last_step, _metrics_of(last), last.get(self.metrics.detail_key))
        with self.times("checkpoints"):
            save_resumable(self.accelerator, self.out, self.state, meta, self.cfg.train.keep_checkpoints,
                           self.checkpoint_writer)

    def stop_now(self) -> NoReturn:
        with self.times("checkpoints"):
            self.checkpoint_writer.close()  # the checkpoint just taken is on disk before the process ends
        self.stop.leaving()
        unlock_run_dir(self.out)
        self.tracker.close()
        self.accelerator.end_training()
        raise TrainingStopped(f"{self.stop.describe()} after step {self.state.step}, a resumable checkpoint "
                              f"saved; resume with train.resume=auto (train.output_dir={self.out})",
                              self.stop.exit_code)

    def finish(self) -> FitResult:
        """Save RUN/last (the last validation's metrics), plots and summary; close the run."""
        last, best = self.last_validation, self.state.best
        with self.times("checkpoints"):
            self.checkpoint_writer.close()
        if self.stopped_improving():
            self.accelerator.print(
                f"stopped early after step {self.state.step} of {self.layout.total_steps}: {self.cfg.train.monitor} "
                f"has not improved for {best.since} validations (train.early_stop_patience="
                f"{self.cfg.train.early_stop_patience})")
        self.save_model("last", self.state.epoch_of_last_step, _metrics_of(last), last.get(self.metrics.detail_key))
        with self.times("report"):
            if self.accelerator.is_main_process and self.cfg.tracking.plots:
                write_plots_and_summary(self.out)
            self.accelerator.wait_for_everyone()
        unlock_run_dir(self.out)
        self.stop.restore()
        with self.times("trackers"):
            self.tracker.close()
            self.accelerator.end_training()  # also closes the wandb run
        self.accelerator.print(self.times.line())
        self.accelerator.print(
            f"best {self.cfg.train.monitor} {best.value:.4f} at epoch {best.epoch}; "
            f"{time.perf_counter() - self.times.started:.1f}s; checkpoints in {self.out}/best and {self.out}/last"
        )
        return FitResult(best.metrics or {}, best.epoch, self.out, self.state.full_model())

def _last_validation(out: Path) -> dict[str, Any]:
    """The newest validation record a resumed run's metrics.jsonl holds."""
    validations = [r for r in read_metrics(out / "metrics.jsonl") if "val/loss" in r]
    return validations[-1] if validations else {}


def _metrics_of(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if k in ALL_METRIC_NAMES + ALL_EMA_METRIC_NAMES}


def start_run(cfg: Config, datasets: Datasets | None = None) -> Run:
    """Build the run from its config, resumed from a checkpoint when `train.resume` finds one."""
    times = RunTimes()
    datasets = datasets or resolve_datasets(cfg.data)
    check_metrics_measured(cfg, datasets.num_classes)
    workers.start_helpers(fork_server=cfg.data.num_workers > 0)  # already started by `dist-train train`
    accelerator = make_accelerator(cfg.train)
    startup_clock.mark("accelerator")
    out = Path(cfg.train.output_dir)
    resume_from = find_resume_checkpoint(cfg.train.resume, out)
    # Refused before anything in the run directory changes; what applies is said below.
    changes = check_resume_config(saved_config(resume_from), cfg, str(resume_from)) if resume_from else []
    replanned = bool(resume_from and changes_what_follows(saved_config(resume_from), cfg))
    teacher = None
    if cfg.distill.teacher:  # refused here too if it does not fit or changed since the checkpoint
        teacher = load_teacher(cfg, datasets.num_classes)
        if resume_from:
            check_teacher_unchanged(saved_meta(resume_from), teacher.identity, str(resume_from))
        memory_format = torch.channels_last if cfg.model.channels_last else torch.preserve_format
        teacher.to(accelerator.device, memory_format)
    if cfg.model.weights and not resume_from:
        weights_path(cfg.model.weights)  # missing (a hub entry not cached): refused before the run directory
    prepare_run_dir(cfg, out, accelerator, resuming=resume_from is not None)
    set_seed(cfg.train.seed)  # the same on every rank: DDP also broadcasts rank 0's weights
    # find_resume_checkpoint has just checked every file's hash.
    saved = load_resumable(resume_from, accelerator.process_index, hashes_checked=True) if resume_from else None
    # A resumed run keeps its order, and so its global batch, on any number of processes.
    order, layout = plan_layout(cfg, accelerator, datasets.train.samples,
                                OrderSpec(**saved.members["order"]) if saved else None)

    model = model_from_config(cfg.model, datasets.num_classes, cfg.data.channels)
    # A resumed run's weights come from its checkpoint; the pretrained ones were its start.
    pretrained = load_pretrained(model, cfg.model.weights, cfg.data) if cfg.model.weights and not saved else None
    if cfg.model.sync_batchnorm and layout.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)  # inputs follow the weights' layout
    # FSDP: every rank built the same weights (the same seed, the same pretrained file) and keeps
    # its shards of them; `replica` is the unsharded copy validation runs (TrainState.replica).
    replica, sharding = shard_for_training(model, cfg.train, accelerator.device, layout.world_size,
                                           accelerator.mixed_precision)
    # After sharding: the optimizer holds the parameters the model trains, sharded or not.
    optimizer = build_optimizer(model, cfg.optim, global_batch=layout.global_batch)
    # The schedule is ours, stepped once per optimizer step, not passed to prepare():
    # accelerate would step it once per process.
    schedule = Schedule(optimizer, cfg.sched, layout.steps_per_epoch, layout.epochs)
    if sharding:  # prepare() would wrap the sharded model in DDP
        optimizer = accelerator.prepare(optimizer)
    else:
        with warnings.catch_warnings():
            # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, and itself advises
            # keeping broadcast_buffers=False (DDP_SETTINGS, why: runtime/accelerator.py) until
            # init_sync_buffers exists: said at every launch, it would only be noise.
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            model, optimizer = accelerator.prepare(model, optimizer)
    startup_clock.mark("model")
    state = TrainState(accelerator, model, optimizer, schedule, order, layout.steps_per_epoch, replica)
    if cfg.train.ema_decay:
        warmup_steps = round(cfg.sched.warmup_epochs * layout.steps_per_epoch)
        state.ema = WeightsEma(state.bare_model, ema_decay_per_update(cfg.train, layout.global_batch),
                               cfg.train.ema_warmup, cfg.train.ema_every_steps,
                               copy_through_step=warmup_steps if cfg.train.ema_copy_in_warmup else 0)
    if saved:
        state.resume_from(saved)  # random states last: nothing above draws from them again
        if accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", state.step)  # the later records come again
        accelerator.wait_for_everyone()
    last_validation = _last_validation(out) if saved and accelerator.is_main_process else {}
    state.launches.started(state.step, asdict(layout))
    startup_clock.mark("resume" if saved else "run directory")

    accelerator.print(
        f"dist-train {__version__}: {layout.world_size} process(es) on {accelerator.device.type} "
        f"({accelerator.distributed_type.value}{', ' + sharding if sharding else ''}), "
        f"mixed precision {accelerator.mixed_precision}; "
        f"{datasets.train.samples} train / {datasets.val.samples} val samples, "
        f"{layout.steps_per_epoch} steps per epoch of {layout.global_batch} images"
        + (f"; resuming from {resume_from} at epoch {state.epoch}, step {state.step}" if saved else "")
    )
    if pretrained:
        accelerator.print(pretrained.line())
    if changes:
        accelerator.print(f"changed since the checkpoint, applied from step {state.step}: {'; '.join(changes)}")
    report_damage(accelerator, datasets)
    criterion = build_loss(cfg.loss, datasets.num_classes, lambda: train_class_counts(cfg.data, datasets),
                           task=cfg.data.task)
    if teacher:
        accelerator.print(f"distilling from {cfg.distill.teacher} (sha256 {teacher.identity.sha256[:12]}...): "
                          f"alpha {cfg.distill.alpha:g}, temperature {cfg.distill.temperature:g}")
    stage = device_stage(cfg.data, accelerator.device)
    sampler = None
    if order.sampling != "uniform":  # what draws each epoch (data/sampling.py)
        sampler = epoch_sampler(cfg.data, datasets.train, datasets.num_classes,
                                cache_if_remote([cfg.data.train], cfg.data))
    resolution = resolution_schedule(cfg.data, layout.epochs)
    train_loader = TrainLoader(TrainStreamSpec(
        shards=datasets.train, order=order, epoch=state.epoch, num_classes=datasets.num_classes,
        batch_size=layout.batch_size, grad_accum_steps=layout.grad_accum_steps, rank=accelerator.process_index,
        world_size=layout.world_size, start_step=state.step_in_epoch,
        # Set by torchrun (and so by accelerate launch) on each node; ranks of a node are consecutive.
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), epochs=layout.epochs,
        sampler=sampler, resolution=resolution,
    ), cfg.data, pin_memory=accelerator.device.type == "cuda", for_device_stage=stage is not None)
    startup_clock.mark("training loader")
    tracker = RunTracker(accelerator, cfg, out, datasets.class_names, resumed_at=state.step if saved else None,
                         replanned=replanned)
    startup_clock.mark("tracking")
    return Run(
        cfg=cfg, accelerator=accelerator, out=out, datasets=datasets, layout=layout, state=state,
        criterion=criterion.to(accelerator.device),
        train_loader=train_loader,
        tracker=tracker,
        progress=TrainProgress(accelerator, show_bar=cfg.train.progress_bar),
        stop=StopRequest(accelerator),
        times=times,
        last_validation=last_validation,
        pretrained=pretrained.as_meta() if pretrained else None,
        forward_seeds=ForwardSeeds(order.seed, accelerator.process_index, layout.grad_accum_steps, accelerator.device),
        mixer=make_mixer(cfg.data, datasets.num_classes, order.seed, accelerator.process_index,
                         layout.grad_accum_steps),
        device_stage=stage,
        resolution=resolution,
        teacher=teacher,
    )
