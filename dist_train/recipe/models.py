"""Build a classifier by name: any torchvision classification model, any timm model
(`timm/<name>`), or a small CNN for CPUs.

    model = create_model("resnet18", num_classes=10, in_channels=1)
    model = create_model("timm/convnext_tiny", num_classes=10)
    model = model_from_config(cfg.model, num_classes=10, in_channels=3)  # model.kwargs and the rest

`model.kwargs` go to the constructor (timm's drop_path_rate, a torchvision builder's
stochastic_depth_prob); `model.grad_checkpointing` turns on activation checkpointing (timm's own, or torch's
wrapper per block).

Weights start random: dist-train never downloads pretrained weights at run time (saved ones
come from a local file: `model.weights`, pretrained.py).
"""

from __future__ import annotations

import functools

import torch
import torchvision
from torch import nn

from dist_train.config import ModelConfig
from dist_train.errors import ConfigError
from dist_train.runtime.blocks import repeated_blocks


class SmallCNN(nn.Module):
    """Four 3x3 conv layers and a linear head: trains digits to ~99% in seconds on a CPU.
    `width`: the first two layers' channels (the last two have twice as many).

    `norm="group"` (model name `small_cnn_gn`) uses GroupNorm: no batch statistics, so the
    result does not depend on how a global batch is split over processes and micro-batches.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, norm: str = "batch"):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            norm_layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(8, cout)
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer, nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def model_from_config(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The run's model: `create_model` with model.kwargs, and model.grad_checkpointing."""
    model = create_model(cfg.name, num_classes, in_channels, cfg.kwargs)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model, cfg.name)
    return model


def create_model(name: str, num_classes: int, in_channels: int = 3, kwargs: dict | None = None) -> nn.Module:
    if num_classes < 2:
        raise ConfigError(f"data.num_classes must be at least 2, got {num_classes}")
    kwargs = kwargs or {}
    if name in ("small_cnn", "small_cnn_gn"):  # model.kwargs: width (the first layers' channels)
        if name == "small_cnn_gn" and kwargs.get("width", 8) % 8:
            raise ConfigError(f"model.kwargs.width of small_cnn_gn must be a multiple of 8 (its 8 groups), "
                              f"got {kwargs['width']}")
        return _constructed(name, kwargs, SmallCNN, num_classes, in_channels,
                            norm="group" if name == "small_cnn_gn" else "batch")
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name.removeprefix(TIMM_PREFIX), num_classes, in_channels, kwargs)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"model.name: unknown model {name!r} (e.g. small_cnn, small_cnn_gn, resnet18, resnet50)")
    model = _constructed(name, kwargs, torchvision.models.get_model, name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _constructed(name: str, kwargs: dict, constructor, *args, **fixed) -> nn.Module:
    """The constructor's model, or a one-line error naming the model.kwargs it does not take."""
    try:
        return constructor(*args, **fixed, **kwargs)
    except TypeError as exc:
        if not kwargs:
            raise
        raise ConfigError(f"model.kwargs {kwargs} do not fit {name}: {' '.join(str(exc).split())}") from None


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """Activation checkpointing of the model's blocks: timm's own where the model has it, else
    torch's checkpoint wrapper around each repeated block (runtime/blocks.py); or an error
    naming the model. Either way the recomputation replays the forward's random state (dropout,
    drop path), so the gradients are those of the plain forward."""
    if hasattr(model, "set_grad_checkpointing"):
        try:
            model.set_grad_checkpointing(True)
            return
        except (AssertionError, NotImplementedError) as exc:  # timm's way of saying a model cannot
            raise ConfigError(f"model.grad_checkpointing: {name} does not support it ({exc or 'timm says so'})"
                              ) from None
    blocks = repeated_blocks(model)
    if not blocks:
        raise ConfigError(f"model.grad_checkpointing: {name} has no repeated blocks to checkpoint (found none of "
                          "blocks, stages, layers, layer1-4, features)")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    # Non-reentrant: works with inputs that need no gradient and inside FSDP; the wrapper keeps
    # the state dict's names (it strips its own prefix), so checkpoints do not change.
    wrap = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    chosen = {id(block) for block in blocks}
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: id(m) in chosen)


TIMM_PREFIX = "timm/"


def _timm_model(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    """timm's own constructor: its head for `num_classes`, its stem for `in_channels`."""
    import timm  # imported when asked for: it takes a second

    if not timm.is_model(name):
        raise ConfigError(f"model.name: timm has no model {name!r} (timm.list_models() lists them, "
                          "e.g. timm/convnext_tiny, timm/vit_tiny_patch16_224, timm/resnet18)")
    return _constructed(name, kwargs, timm.create_model, name, pretrained=False, num_classes=num_classes,
                        in_chans=in_channels)


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first convolution by one with `in_channels` inputs (e.g. grayscale)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride,
                    child.padding, child.dilation, child.groups, child.bias is not None,
                ))
                return
    raise ConfigError(f"model has no Conv2d to adapt to {in_channels} input channels")


def logits_of(model, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's logits (validation, eval, predict); with flip test-time augmentation
    (data.tta=flip), the mean of the image's and its horizontal mirror's logits."""
    outputs = model(images)
    if tta == "flip":
        outputs = (outputs + model(images.flip(-1))) / 2  # NCHW: the last dimension is the width
    return outputs
