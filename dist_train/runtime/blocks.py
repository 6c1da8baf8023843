"""A network's repeated blocks: the unit that FSDP shards (runtime/fsdp.py) and that activation
checkpointing recomputes (recipe/models.py).

Found by where the model families keep them, not by a list of classes: timm's transformers and
many of its ConvNets hold them in `blocks` (ViT, DeiT, EVA, EfficientNet's stages) or `stages`
(ConvNeXt, RegNet), Swin in `layers`; torchvision's ResNets in `layer1`..`layer4`, its ViT in
`encoder.layers`, most of the rest in `features`. A model with none of these has no blocks:
FSDP then shards it as one unit, and activation checkpointing says it cannot.
"""

from __future__ import annotations

from torch import nn

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
CONTAINERS = ("blocks", "stages", "layers", "encoder.layers", "features")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks in forward order (only those with parameters), or [] when it has none."""
    stages = [getattr(model, name) for name in RESNET_STAGES if isinstance(getattr(model, name, None), nn.Module)]
    if len(stages) >= 2:
        return stages
    for path in CONTAINERS:
        container = _attribute(model, path)
        if isinstance(container, nn.Sequential | nn.ModuleList):
            blocks = [child for child in container.children() if _has_parameters(child)]
            if len(blocks) >= 2:
                return blocks
    return []


def _attribute(model: nn.Module, path: str) -> object:
    node: object = model
    for name in path.split("."):
        node = getattr(node, name, None)
    return node


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None
