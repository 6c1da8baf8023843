"""Optimizers and learning-rate schedules chosen by config.

Step and cosine schedules (with optional linear warmup in front) are closed-form functions of
the optimizer step, so they are exact at any step and trivially resumable:

    step:    lr = base * gamma ** floor(t / step_size)          (like torch's StepLR)
    cosine:  lr = min + (base - min) * (1 + cos(pi * t' / T)) / 2  (like CosineAnnealingLR)
    warmup:  lr = base * (start + (1 - start) * t / warmup) for t < warmup

where t counts optimizer steps from 0, and for cosine t' = t - warmup runs over the
T = total - warmup steps after warmup. Epoch-denominated settings (`warmup_epochs`,
`step_size_epochs`) are converted with the exact number of steps per epoch. ReduceLROnPlateau
is stepped after each validation with the monitored metric.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dist_train.config import OptimConfig, SchedConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The configured LR, scaled linearly with the global batch when `lr_base_batch` is set."""
    return cfg.lr if cfg.lr_base_batch is None else cfg.lr * global_batch / cfg.lr_base_batch


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW; `global_batch` (images per optimizer step) feeds `lr_base_batch` scaling."""
    lr = scaled_lr(cfg, global_batch) if global_batch else cfg.lr
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        # Biases and normalization weights are the 1-d parameters.
        (no_decay if param.ndim <= 1 and not cfg.decay_norm_and_bias else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))


class Schedule:
    """One interface for both kinds of schedule: per optimizer step, or per validation."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedConfig, steps_per_epoch: int, epochs: int):
        self.cfg = cfg
        self.optimizer = optimizer
        if cfg.name == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=cfg.plateau_mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience
            )
        else:
            factor = lr_factor_fn(cfg, steps_per_epoch, epochs, base_lr=optimizer.param_groups[0]["lr"])
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def after_optimizer_step(self) -> None:
        if self.cfg.name != "plateau":
            self.scheduler.step()

    def after_validation(self, metrics: dict[str, float]) -> None:
        if self.cfg.name == "plateau":
            self.scheduler.step(metrics[self.cfg.plateau_monitor])

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def lr_factor_fn(cfg: SchedConfig, steps_per_epoch: int, epochs: int, base_lr: float):
    """The multiplier of the base LR at optimizer step t (see the module docstring)."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    step_size = max(1, round(cfg.step_size_epochs * steps_per_epoch))
    min_ratio = cfg.min_lr / base_lr

    def factor(t: int) -> float:
        if t < warmup:
            return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * t / warmup
        if cfg.name == "step":
            return cfg.gamma ** (t // step_size)
        if cfg.name == "cosine":
            span = max(1, total - warmup)
            progress = min(1.0, (t - warmup) / span)
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor
