"""Knowledge distillation from a teacher's logits (`distill.*`; Hinton et al. 2015, DeiT's soft
distillation, timm's LogitDistillationTask):

    loss = (1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

the KL averaged over the micro-batch (batchmean), so gradient accumulation and DDP average it
exactly as they average the task loss: a global batch of W x K x b is one batch of W*K*b.

The teacher is a dist-train model checkpoint (`distill.teacher: runs/big/best`, hash checked,
rebuilt from its config), or a model name with a local weights file (`distill.teacher:
timm/resnet50`, `distill.teacher_weights: resnet50.safetensors`): never a download. It sees
the student's images as the student does (after mixup / cutmix, at the progressive size),
renormalized when it was trained with another mean and std; it runs in eval mode, under
no_grad and the run's autocast. It is no part of the model DDP wraps (no gradient, so no
all-reduce) nor of any checkpoint: meta.json records its source and its files' SHA-256, and a
resume refuses a teacher whose files changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.checkpoint import load_model_checkpoint, sha256_file
from dist_train.checkpoint.model import WEIGHTS_NAME
from dist_train.config import Config, DistillConfig, config_from_dict
from dist_train.errors import CheckpointError, ConfigError
from dist_train.recipe.pretrained import HUB_PREFIX, hub_weights


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) of the softened distributions, averaged over the batch; T^2
    keeps the gradient's scale independent of T (Hinton et al.). In float32 under autocast."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


@dataclass(frozen=True)
class TeacherIdentity:
    """What a run records of its teacher (meta.json `distill`), and a resume compares."""

    source: str  # the checkpoint directory, or the model name
    weights: str  # the weights file read
    sha256: str

    def as_meta(self, cfg: DistillConfig) -> dict[str, Any]:
        return {**asdict(self), "alpha": cfg.alpha, "temperature": cfg.temperature}


def teacher_identity(cfg: DistillConfig, verified_sha256: str | None = None) -> TeacherIdentity:
    """The teacher's weights file and its hash (`verified_sha256`: one already checked against
    the file, a checkpoint's meta.json's: the file is not read again)."""
    weights = _weights_file(cfg)
    return TeacherIdentity(cfg.teacher, str(weights.resolve()), verified_sha256 or sha256_file(weights))


def _weights_file(cfg: DistillConfig) -> Path:
    """The teacher's weights file, or one line saying why there is none."""
    assert cfg.teacher is not None
    if cfg.teacher_weights is None:
        weights = Path(cfg.teacher) / WEIGHTS_NAME
        if not weights.is_file():
            raise CheckpointError(f"distill.teacher: {cfg.teacher} is not a dist-train model checkpoint (no "
                                  f"{WEIGHTS_NAME}); a model name needs distill.teacher_weights")
    elif cfg.teacher_weights.startswith(HUB_PREFIX):  # the local Hugging Face cache's file
        weights = hub_weights(cfg.teacher_weights)[0]
    else:
        weights = Path(cfg.teacher_weights)
        if not weights.is_file():
            raise CheckpointError(f"distill.teacher_weights: {weights} not found")
    return weights


def check_teacher_unchanged(saved_meta: dict[str, Any] | None, identity: TeacherIdentity, checkpoint: str) -> None:
    """A resume distills from the very teacher the checkpoint's steps did (its weights' hash)."""
    saved = (saved_meta or {}).get("distill") or {}
    if saved.get("sha256") != identity.sha256:
        was = saved.get("sha256", "none")[:12]
        raise ConfigError(f"distill.teacher: {identity.weights} changed since {checkpoint} was written (sha256 "
                          f"{was}... then, {identity.sha256[:12]}... now); resume with the teacher it trained with")


class Teacher:
    """The frozen teacher of a run: `loss` blends its distillation term into the task loss."""

    def __init__(self, model: nn.Module, cfg: DistillConfig, identity: TeacherIdentity,
                 renormalize: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.alpha, self.temperature = cfg.alpha, cfg.temperature
        self.identity = identity
        self.meta = identity.as_meta(cfg)
        # x_teacher = x_student * scale + shift: the student's normalization undone, the teacher's applied.
        self._renormalize = renormalize

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> Teacher:
        self.model.to(device, memory_format=memory_format)
        if self._renormalize is not None:
            self._renormalize = tuple(t.to(device) for t in self._renormalize)
        return self

    def logits(self, images: torch.Tensor, accelerator) -> torch.Tensor:
        if self._renormalize is not None:
            scale, shift = self._renormalize
            images = images * scale + shift
        with torch.no_grad(), accelerator.autocast():
            return self.model(images)

    def loss(self, task_loss: torch.Tensor, student_logits: torch.Tensor, images: torch.Tensor,
             accelerator) -> torch.Tensor:
        """(1 - alpha) task_loss + alpha T^2 KL, of the teacher's logits of the same images."""
        distill = distillation_loss(student_logits, self.logits(images, accelerator), self.temperature)
        return (1 - self.alpha) * task_loss + self.alpha * distill


def load_teacher(cfg: Config, num_classes: int) -> Teacher:
    """The run's teacher (on the CPU), checked to fit the student's classes and images, with
    its identity (a resume compares it: `check_teacher_unchanged`)."""
    from dist_train.recipe.models import create_model, model_from_config
    from dist_train.recipe.pretrained import load_pretrained

    d = cfg.distill
    if d.teacher_weights is None:  # a dist-train checkpoint: its own config rebuilds it
        _weights_file(d)  # one line if it is no checkpoint
        state, meta = load_model_checkpoint(d.teacher)  # its weights checked against meta.json's hash
        identity = teacher_identity(d, meta.get("weights_sha256"))
        try:
            saved = config_from_dict(meta["config"])
        except (ConfigError, KeyError, TypeError) as exc:
            raise CheckpointError(f"distill.teacher: {d.teacher}/meta.json holds no usable config ({exc})") from None
        classes, channels = meta.get("num_classes"), saved.data.channels
        _check_fits(d.teacher, classes, channels, num_classes, cfg.data.channels)
        model = model_from_config(saved.model, classes, channels)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"distill.teacher: {d.teacher}: weights do not fit its config's model "
                                  f"({' '.join(str(exc).split())[:200]})") from None
        mean, std = saved.data.mean, saved.data.std
    else:  # a model name and a weights file, which must hold every tensor, the head too
        identity = teacher_identity(d)
        model = create_model(d.teacher, num_classes, cfg.data.channels, d.teacher_kwargs)
        report = load_pretrained(model, d.teacher_weights)
        missing = [k for k in report.new if not k.endswith("num_batches_tracked")]
        if missing:
            raise CheckpointError(f"distill.teacher_weights: {d.teacher_weights} lacks {missing[0]}"
                                  + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                                  + f" (a teacher needs its trained head for {num_classes} classes)")
        # timm's teachers were trained with their pretrained_cfg's normalization (timm's rule).
        pretrained = getattr(model, "pretrained_cfg", None) or {}
        mean, std = list(pretrained.get("mean", cfg.data.mean)), list(pretrained.get("std", cfg.data.std))
    return Teacher(model, d, identity, _renormalization(cfg.data.mean, cfg.data.std, mean, std, cfg.data.channels))


def _check_fits(source: str, classes: Any, channels: int, num_classes: int, in_channels: int) -> None:
    if classes != num_classes:
        raise ConfigError(f"distill.teacher: {source} predicts {classes} classes, the student {num_classes}")
    if channels != in_channels:
        raise ConfigError(f"distill.teacher: {source} takes {channels}-channel images, the student's data "
                          f"has data.channels={in_channels}")


def _renormalization(mean: list[float], std: list[float], teacher_mean: list[float], teacher_std: list[float],
                     channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) taking the student's normalized pixels to the teacher's; None if alike."""
    def column(values: list[float]) -> torch.Tensor:
        if len(values) != channels:  # one value for every channel, or grayscale from RGB's statistics
            values = [sum(values) / len(values)] * channels
        return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)

    m, s, tm, ts = map(column, (mean, std, teacher_mean, teacher_std))
    if torch.equal(m, tm) and torch.equal(s, ts):
        return None
    return s / ts, (m - tm) / ts
