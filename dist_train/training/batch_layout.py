"""How a launch lays the run's global batch out over its processes, and what follows from it.

The global batch (images per optimizer step) is fixed by a run's first launch and kept by
every resume, on any number of processes: a resume on fewer processes accumulates more
micro-batches. `RunLayout` is what actually ran; meta.json records it (`layout`) and the
report reads it from there, since config.yaml says what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from accelerate import Accelerator

from dist_train.config import MAX_LR, Config
from dist_train.data.order import OrderSpec, steps_per_epoch
from dist_train.errors import ConfigError, DataError
from dist_train.recipe.optim import scaled_lr


@dataclass(frozen=True)
class RunLayout:
    world_size: int
    grad_accum_steps: int
    batch_size: int  # per process, per micro-step
    global_batch: int  # world_size x grad_accum_steps x batch_size
    steps_per_epoch: int
    epochs: int
    base_lr: float  # optim.lr, scaled to the global batch when optim.lr_base_batch is set

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


MAX_EPOCH_FACTOR = 100  # a sampled epoch oversamples rare classes a few times, not a hundred
MAX_SAMPLES_PER_EPOCH = 20_000_000  # its drawn order: about 460 MB a process


def plan_layout(cfg: Config, accelerator: Accelerator, train_samples: int,
                saved_order: OrderSpec | None = None) -> tuple[OrderSpec, RunLayout]:
    """The training order (a resumed run's own, else a new one) and this launch's layout.
    Tells accelerate the accumulation steps that keep the global batch."""
    world, batch = accelerator.num_processes, cfg.data.batch_size
    order = saved_order or OrderSpec(seed=cfg.train.seed, global_batch=world * cfg.train.grad_accum_steps * batch,
                                     partitions=world, window=cfg.data.shuffle_buffer,
                                     sampling=cfg.data.sampling, samples_per_epoch=cfg.data.samples_per_epoch,
                                     repeats=cfg.data.repeated_augment)
    accum, rest = divmod(order.global_batch, world * batch)
    if rest or accum == 0:
        raise ConfigError(
            f"cannot keep the run's global batch of {order.global_batch} on {world} processes with "
            f"data.batch_size={batch}: choose data.batch_size so that processes x accumulation x batch_size "
            f"= {order.global_batch}"
        )
    if accum != cfg.train.grad_accum_steps:
        accelerator.print(f"train.grad_accum_steps {cfg.train.grad_accum_steps} -> {accum}: keeps the global "
                          f"batch of {order.global_batch} on {world} process(es)")
    accelerator.gradient_accumulation_steps = accum
    epoch_samples = order.samples_per_epoch or train_samples  # a sampled epoch may be set longer or shorter
    most = min(MAX_EPOCH_FACTOR * train_samples, MAX_SAMPLES_PER_EPOCH)
    if epoch_samples > most:  # each process draws the epoch's order at once: ~23 bytes a sample
        raise ConfigError(f"data.samples_per_epoch={epoch_samples:,} is more than {most:,} ({MAX_EPOCH_FACTOR} x "
                          f"the training set's {train_samples:,} samples, at most {MAX_SAMPLES_PER_EPOCH:,})")
    steps = steps_per_epoch(epoch_samples, order.global_batch)
    if steps == 0:
        raise DataError(
            f"an epoch has {epoch_samples} samples, fewer than one global batch "
            f"({world} processes x {accum} accumulation steps x {batch} = {order.global_batch})"
        )
    base_lr = scaled_lr(cfg.optim, order.global_batch)
    if base_lr > MAX_LR:
        raise ConfigError(f"optim.lr={cfg.optim.lr:g} scaled to the global batch of {order.global_batch} "
                          f"(optim.lr_base_batch={cfg.optim.lr_base_batch}) is {base_lr:g}, more than {MAX_LR:g}")
    layout = RunLayout(world_size=world, grad_accum_steps=accum, batch_size=batch, global_batch=order.global_batch,
                       steps_per_epoch=steps, epochs=cfg.train.epochs,
                       base_lr=base_lr)
    return order, layout
