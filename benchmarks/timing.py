"""What every figure of `dist-train bench` is timed with: the product's own optimizer step over
batches held in memory, and a ratio of two rates measured side by side."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepOnly:
    """What `engine.optimizer_step` reads of a `Run`, for steps on batches held in memory: the
    product's step, without the data, validation and checkpoints around it."""

    cfg: Any
    accelerator: Any
    state: Any
    criterion: Any
    progress: Any
    forward_seeds: Any  # the per-micro-batch seeding of dropout: part of the product's step
    mixer: Any = None
    device_stage: Any = None
    teacher: Any = None  # knowledge distillation (recipe/distill.py): none in the timed steps

    def frozen_at(self, step: int) -> list:
        return []


def fit_steps(model, batches: Iterable, steps: int, optimizer, schedule, accelerator, accum: int = 1,
              log_every_steps: int = 10, criterion=None, device_stage=None) -> list[dict]:
    """`steps` optimizer steps as `fit` takes them (`engine.optimizer_step`, the same function)
    over `accum` micro-batches each, and a train record (a collective) every `log_every_steps`,
    as `fit` logs them. Returns the records."""
    from dist_train.config import Config
    from dist_train.data.order import OrderSpec
    from dist_train.runtime.seeds import ForwardSeeds
    from dist_train.training.engine import optimizer_step
    from dist_train.training.progress import TrainProgress
    from dist_train.training.state import TrainState

    progress = TrainProgress(accelerator, show_bar=False)
    progress.start_epoch(0, steps)
    order = OrderSpec(seed=0, global_batch=1, partitions=1, window=1)
    state = TrainState(accelerator, model, optimizer, schedule, order, steps_per_epoch=steps)
    forward_seeds = ForwardSeeds(0, accelerator.process_index, accum, accelerator.device)
    run = StepOnly(Config(), accelerator, state, criterion or torch.nn.CrossEntropyLoss(), progress, forward_seeds,
                   device_stage=device_stage)
    micro_batches = iter(batches)
    records = []
    for step in range(1, steps + 1):
        optimizer_step(run, itertools.islice(micro_batches, accum))
        if step % log_every_steps == 0:
            records.append(progress.train_record(0, step, schedule.lr))
    return records


def ratio(ours, theirs, repeats: int, warmup: bool = True) -> float:
    """median(ours) / median(theirs) of rates measured in ABBA order, after one untimed run of
    each, so that warm-up and slow drifts of the machine hit both sides alike."""
    if warmup:
        ours(), theirs()
    a, b = [], []
    for i in range(repeats):
        pair = ((ours, a), (theirs, b)) if i % 2 == 0 else ((theirs, b), (ours, a))
        for measure, sink in pair:
            sink.append(measure())
    return statistics.median(a) / statistics.median(b)
