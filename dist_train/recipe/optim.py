"""Optimizers and learning-rate schedules chosen by config.

Step, cosine and linear schedules (with optional linear warmup in front) are closed-form
functions of the optimizer step, so they are exact at any step and trivially resumable:

    step:    lr = base * gamma ** floor(t / step_size)          (like torch's StepLR)
    cosine:  lr = min + (base - min) * (1 + cos(pi * t' / T)) / 2  (like CosineAnnealingLR)
    linear:  lr = min + (base - min) * (1 - t' / T)              (FFCV's "cyclic": up, then down)
    warmup:  lr = base * (start + (1 - start) * t / warmup) for t < warmup

where t counts optimizer steps from 0, and for cosine and linear t' = t - warmup runs over the
T = total - warmup steps after warmup. Epoch-denominated settings (`warmup_epochs`,
`step_size_epochs`) are converted with the exact number of steps per epoch. ReduceLROnPlateau
is stepped after each validation with the monitored metric.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from dist_train.config import OptimConfig, SchedConfig
from dist_train.errors import ConfigError


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The configured LR, scaled linearly with the global batch when `lr_base_batch` is set."""
    return cfg.lr if cfg.lr_base_batch is None else cfg.lr * global_batch / cfg.lr_base_batch


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int | None = None) -> torch.optim.Optimizer:
    """torch's SGD or AdamW, or any optimizer of timm's factory (`timm.optim.create_optimizer_v2`:
    LAMB, LARS, Lion, ADOPT, NAdamW, ...), given dist-train's parameter groups; `global_batch`
    (images per optimizer step) feeds `lr_base_batch` scaling.

    Parameter groups by weight decay and LR scale, as timm's factory makes them: no decay on
    1-d parameters (biases, normalization weights) nor on the model's own `no_weight_decay()`
    (a ViT's position embedding and class token) unless `optim.decay_norm_and_bias`;
    `optim.layer_decay` (BEiT's layer-wise LR decay: layer i of L gets decay^(L-1-i)) and
    `optim.head_lr_mult` (the classifier head's LR multiplier) set each parameter's scale; a
    group's "lr_scale" is kept beside its LR."""
    lr = scaled_lr(cfg, global_batch) if global_batch else cfg.lr
    groups = param_groups(model, cfg, lr)
    betas = {"betas": tuple(cfg.betas)} if cfg.betas is not None else {}
    eps = {"eps": cfg.eps} if cfg.eps is not None else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **betas, **eps)
    return _timm_optimizer(groups, cfg, lr, {**betas, **eps})


def _timm_optimizer(groups: list[dict], cfg: OptimConfig, lr: float, extra: dict) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2, list_optimizers  # imported when asked for: it takes a second

    if cfg.name not in list_optimizers():
        raise ConfigError(f"optim.name: {cfg.name!r} is neither sgd, adamw nor one of timm's optimizers "
                          f"(timm.optim.list_optimizers(): e.g. lamb, lars, lion, adopt, nadamw, rmsproptf)")
    try:
        # Groups carry their own weight decay: the factory's is only a default they override.
        return create_optimizer_v2(groups, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **extra)
    except (ValueError, TypeError, ImportError) as exc:  # e.g. a bitsandbytes optimizer without the package
        raise ConfigError(f"optim.name={cfg.name}: timm cannot build it here ({' '.join(str(exc).split())})") from None


def param_groups(model: nn.Module, cfg: OptimConfig, lr: float) -> list[dict]:
    """The optimizer's parameter groups (see `build_optimizer`), biggest decay first."""
    scales = lr_scales(model, cfg)
    exempt = no_weight_decay_names(model)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (param.ndim <= 1 or name in exempt) and not cfg.decay_norm_and_bias
        groups.setdefault((0.0 if no_decay else cfg.weight_decay, scales[id(param)]), []).append(param)
    return [{"params": params, "weight_decay": decay, "lr": lr * scale, "lr_scale": scale}
            for (decay, scale), params in sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1]))]


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters the model says take no weight decay (timm's `no_weight_decay()`: a ViT's
    pos_embed and cls_token), besides the 1-d ones; names or wildcard patterns, as timm's
    factory matches them (fnmatch)."""
    declared = set(getattr(model, "no_weight_decay", set)())
    return {name for name, _ in model.named_parameters() if any(fnmatch.fnmatch(name, p) for p in declared)}


def _base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR before per-group scales, read from the group with the largest (never underflowed)."""
    group = max(optimizer.param_groups, key=lambda g: g.get("lr_scale", 1.0))
    return group["lr"] / group.get("lr_scale", 1.0)


def lr_scales(model: nn.Module, cfg: OptimConfig) -> dict[int, float]:
    """Each parameter's LR scale (by id): layer decay, then the head's multiplier."""
    scales = {id(p): 1.0 for p in model.parameters()}
    if cfg.layer_decay is not None:
        layers, count = layer_ids(model)
        for name, param in model.named_parameters():
            scales[id(param)] = cfg.layer_decay ** (count - 1 - layers[name])
    if cfg.head_lr_mult != 1.0:
        head = head_prefix(model)
        for name, param in model.named_parameters():
            if name.startswith(head):
                scales[id(param)] *= cfg.head_lr_mult
    return scales


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """(layer index of every parameter, number of layers), input side first.

    timm models know their own blocks (`group_matcher`, as timm's own layer decay uses them);
    for others, each top-level module holding parameters is a layer, and each block of a
    top-level sequence of blocks (torchvision's ResNet stages, ConvNeXt's, ViT's encoder) too."""
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=False))
        ids = {name: i for i, names in enumerate(grouped.values()) for name in names}
        return ids, len(grouped)
    ids: dict[str, int] = {}
    layer = 0
    for prefix, child in model.named_children():
        blocks = list(child.named_children()) if isinstance(child, nn.Sequential | nn.ModuleList) else []
        units = [(f"{prefix}.{n}", b) for n, b in blocks] if len(blocks) > 1 else [(prefix, child)]
        for unit_prefix, unit in units:
            names = [f"{unit_prefix}.{n}" for n, _ in unit.named_parameters()]
            if names:
                ids.update(dict.fromkeys(names, layer))
                layer += 1
    return ids, layer


def head_prefix(model: nn.Module) -> str:
    """The name (with a trailing dot) of the last Linear module: the classifier head of
    torchvision's models (fc, classifier.N, heads.head), timm's (head.fc, head) and small_cnn."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return f"{linears[-1]}." if linears else ""


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
            factor = lr_factor_fn(cfg, steps_per_epoch, epochs, base_lr=_base_lr(optimizer))
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def after_optimizer_step(self) -> None:
        if self.cfg.name != "plateau":
            self.scheduler.step()

    def after_validation(self, metrics: dict[str, float]) -> None:
        if self.cfg.name == "plateau":
            self.scheduler.step(metrics[self.cfg.plateau_monitor])

    @property
    def lr(self) -> float:
        """The LR at this step before per-group scaling (what the schedule gives the base LR)."""
        return _base_lr(self.optimizer)

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
        progress = min(1.0, (t - warmup) / max(1, total - warmup))
        if cfg.name == "cosine":
            return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.name == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return 1.0

    return factor
