"""Training losses chosen by config: cross-entropy, label smoothing, focal."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import LossConfig


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): mean over samples of -alpha_y * (1 - p_y)^gamma * log p_y.

    `p_y` is the softmax probability of the true class. With gamma = 0 and no alpha it is
    cross-entropy. `alpha` holds one weight per class (None: all 1).
    """

    def __init__(self, gamma: float = 2.0, alpha: list[float] | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32) if alpha else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Computed in float32 even under autocast: (1 - p)^gamma underflows in half precision.
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1.0 - log_p.exp()) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


def build_loss(cfg: LossConfig) -> nn.Module:
    if cfg.name == "cross_entropy":
        return nn.CrossEntropyLoss()
    if cfg.name == "label_smoothing":
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return FocalLoss(cfg.focal_gamma, cfg.focal_alpha)
