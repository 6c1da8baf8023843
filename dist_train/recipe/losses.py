"""Training losses chosen by config.

    multiclass   cross_entropy, label_smoothing (both optionally class-weighted), focal, bce
    multilabel   bce (binary cross-entropy with logits, per label), asl (asymmetric loss)

Every loss is a mean over the micro-batch's samples of a per-sample loss, so K micro-batches
of b samples average like one batch of K*b (W x K x b equivalence). That is why class weights
multiply each sample's loss and the sum is divided by the sample count, not by the sum of the
weights as `nn.CrossEntropyLoss(weight=...)` does: that normaliser differs between micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import LossConfig
from dist_train.errors import ConfigError


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


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy (with optional label smoothing) where a sample of class c counts weight[c]
    times: mean over samples of weight-scaled per-sample losses. Soft targets (mixup, cutmix)
    weigh each class's term by its weight, as PyTorch does."""

    def __init__(self, weight: Sequence[float], label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", torch.tensor(list(weight), dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, weight=self.weight, label_smoothing=self.label_smoothing,
                               reduction="none").mean()


class OneVsRestBCE(nn.Module):
    """Binary cross-entropy of every class's logit for single-label data ("ResNet strikes back",
    Wightman et al. 2021), as timm's BinaryCrossEntropy computes it: the target is the one-hot
    label, or a mixup / cutmix blend of two (probabilities), smoothed to s/C off and 1 - s + s/C
    on (timm applies the same to mixed targets), then with `target_threshold` made 0 or 1 (a
    mixed image counts as both of its classes); the mean over samples and classes."""

    def __init__(self, smoothing: float = 0.0, target_threshold: float | None = None):
        super().__init__()
        self.smoothing, self.target_threshold = smoothing, target_threshold

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        classes = logits.shape[-1]
        probs = target.float() if target.is_floating_point() else F.one_hot(target, classes).float()
        if self.smoothing:
            probs = probs * (1.0 - self.smoothing) + self.smoothing / classes
        if self.target_threshold is not None:
            probs = probs.gt(self.target_threshold).float()
        return F.binary_cross_entropy_with_logits(logits, probs)


class MultilabelBCE(nn.Module):
    """Binary cross-entropy with logits, summed over labels, averaged over samples."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum(1).mean()


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021) for multi-label data with many negatives:
    positives -(1-p)^gamma_pos log p; negatives -p_m^gamma_neg log(1-p_m), where p_m = max(p -
    clip, 0) drops easy negatives outright. Summed over labels, averaged over samples.
    With gamma_pos = gamma_neg = clip = 0 it is `MultilabelBCE`."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        p = torch.sigmoid(logits)
        log_p = F.logsigmoid(logits)
        if self.clip > 0:  # 1 - p_m >= clip: its log is finite
            p_neg = (p - self.clip).clamp(min=0)
            log_not_p = torch.log1p(-p_neg)
        else:  # log(1 - p) from the logits stays finite where 1 - p rounds to 0
            p_neg, log_not_p = p, F.logsigmoid(-logits)
        positive = (1 - p) ** self.gamma_pos * log_p
        negative = p_neg ** self.gamma_neg * log_not_p
        return -(target * positive + (1 - target) * negative).sum(1).mean()


def auto_class_weights(counts: Sequence[int]) -> list[float]:
    """sklearn's "balanced" weights, n / (classes x n_c), over the classes present."""
    present = [c for c in counts if c > 0]
    return [sum(present) / (len(present) * c) if c > 0 else 0.0 for c in counts]


def build_loss(cfg: LossConfig, num_classes: int = 0,
               class_counts: Callable[[], Sequence[int]] | None = None, task: str = "multiclass") -> nn.Module:
    """`class_counts`: the training set's samples per class, asked for by loss.class_weights=auto.
    Per-class settings must have `num_classes` values (0: not checked)."""
    for key, values in (("loss.class_weights", cfg.class_weights), ("loss.focal_alpha", cfg.focal_alpha)):
        if isinstance(values, list) and num_classes and len(values) != num_classes:
            raise ConfigError(f"{key} has {len(values)} values; the dataset has {num_classes} classes")
    if cfg.name == "bce" and task == "multiclass":
        return OneVsRestBCE(cfg.label_smoothing, cfg.bce_target_threshold)
    if cfg.name == "bce":
        return MultilabelBCE()
    if cfg.name == "asl":
        return AsymmetricLoss(cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip)
    if cfg.name == "focal":
        return FocalLoss(cfg.focal_gamma, cfg.focal_alpha)
    smoothing = cfg.label_smoothing if cfg.name == "label_smoothing" else 0.0
    if cfg.class_weights is None:
        return nn.CrossEntropyLoss(label_smoothing=smoothing)
    if cfg.class_weights == "auto":
        if class_counts is None:
            raise ValueError("loss.class_weights=auto needs the training set's class counts")
        return WeightedCrossEntropy(auto_class_weights(class_counts()), smoothing)
    return WeightedCrossEntropy(cfg.class_weights, smoothing)
