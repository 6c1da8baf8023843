"""An exponential moving average of the model's weights (`train.ema_decay`), as timm's and
torchvision's reference recipes keep one: validated beside the model (`val_ema/*`), often the
better of the two, and selectable as `train.monitor` (best/ then holds the EMA weights).

torch.optim.swa_utils.AveragedModel does the averaging, with the rule of its
`get_ema_multi_avg_fn`; `train.ema_warmup` lowers the decay over the first updates as timm's
ModelEmaV3 does (decay_t = min(decay, 1 - (1 + t)^(-2/3)), its defaults), so that the average is not
dominated by the random initial weights in a short run.

`train.ema_every_steps` = N updates it after every N-th optimizer step only (torchvision's
`--model-ema-steps`: less work per step for a large model); `train.ema_adjust=torchvision`
then reads `ema_decay` as torchvision's reference script does (`ema_decay_per_update`), and
`train.ema_copy_in_warmup` makes the average copy the weights until the LR warmup is over (that
script resets its average after each update of a warmup epoch).

Every rank updates its copy after its optimizer steps from identical weights: the copies
stay identical with no collective. Only parameters are averaged. BatchNorm running
statistics are buffers that differ per rank between validations (accelerator.py), so the
average takes the model's own, rank 0's, whenever it is used (`module_with_buffers_of`), as
ema-pytorch does; averaging them as well would make the ranks' copies differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dist_train.config import TrainConfig

WARMUP_POWER = 2 / 3  # timm ModelEmaV3's default, with warmup_gamma=1


def ema_decay_per_update(cfg: TrainConfig, global_batch: int) -> float:
    """The decay of one update. torchvision's references rescale theirs by the images between
    updates per epoch: alpha = min(1, (1 - decay) x global batch x every / epochs), decay' =
    1 - alpha (0.99998, 32 steps, 1024 images, 600 epochs: 0.99891 every 32 steps)."""
    assert cfg.ema_decay is not None
    if cfg.ema_adjust == "none":
        return cfg.ema_decay
    alpha = min(1.0, (1.0 - cfg.ema_decay) * global_batch * cfg.ema_every_steps / cfg.epochs)
    return 1.0 - alpha


class WeightsEma:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, every_steps: int = 1,
                 copy_through_step: int = 0):
        self.decay, self.warmup, self.every_steps = decay, warmup, every_steps
        # An update whose previous one came at or before this optimizer step copies the weights.
        self.copy_through_step = copy_through_step
        self.updates = 0  # a Python count: reading AveragedModel's n_averaged would sync the device
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=False)

    def decay_at(self, update: int) -> float:
        """The decay of update number `update` (counted from 1)."""
        if self.copy_through_step and (update - 1) * self.every_steps <= self.copy_through_step:
            return 0.0  # a copy: the previous update was still in the LR warmup (or there was none)
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + update) ** -WARMUP_POWER)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (counted from 1) updates the average."""
        return step % self.every_steps == 0

    def update(self, model: nn.Module) -> None:
        """After an optimizer step: fold the model's parameters into the average (the first
        update copies them)."""
        self.updates += 1
        self.averaged.update_parameters(model)

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        get_ema_multi_avg_fn(self.decay_at(self.updates))(averaged, current, num_averaged)

    def module_with_buffers_of(self, model: nn.Module) -> nn.Module:
        """The averaged model, with `model`'s buffers (BatchNorm statistics), ready to evaluate."""
        for ours, theirs in zip(self.averaged.module.buffers(), model.buffers(), strict=True):
            ours.copy_(theirs)
        return self.averaged.module

    # A member of the training state (training/state.py): the averaged parameters and the count.
    def state_dict(self) -> dict[str, Any]:
        params = {name: p.detach() for name, p in self.averaged.module.named_parameters()}
        return {**params, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.averaged.module.named_parameters():
                p.copy_(state[name])
        self.updates = int(state["updates"])
        self.averaged.n_averaged.fill_(self.updates)
