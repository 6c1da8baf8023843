"""Start a model from saved weights (`model.weights`): a local file or run, never a download.

    model.weights: path/resnet18.safetensors   # safetensors
    model.weights: path/resnet18-f37072fd.pth  # a torch state dict (.pth, .pt, .bin), read with
                                               # torch.load(weights_only=True): never unpickled code
    model.weights: runs/pretrain/best          # a dist-train model checkpoint (hash checked)
    model.weights: hf-hub:timm/resnet18.a1_in1k  # from the local Hugging Face cache, never a download

Matched by name (a `module.` prefix from a DDP-saved file is dropped). What does not fit:
- the classifier head, when the class count differs: it stays newly initialised (the usual
  fine-tuning case: ImageNet's 1000 classes to the task's);
- the first convolution, when the input channels differ: adapted, not re-initialised, as timm's
  `adapt_input_conv` does (RGB to grayscale: the sum over the three colour filters);
- any other shape: an error naming the first such key (a backbone of another architecture).
Keys the file has and the model lacks are ignored and listed; `WeightsReport` says what was
loaded, new and ignored, for the run log and meta.json.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dist_train.checkpoint import load_model_checkpoint
from dist_train.config import DataConfig
from dist_train.errors import CheckpointError
from dist_train.recipe.optim import head_prefix

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
LISTED = 5  # keys named in the log line, of each kind


@dataclass
class WeightsReport:
    source: str
    loaded: int = 0
    new: list[str] = field(default_factory=list)  # the model's keys left as initialised (the head)
    adapted: list[str] = field(default_factory=list)  # first conv, to other input channels
    ignored: list[str] = field(default_factory=list)  # in the file, not in the model
    advice: list[str] = field(default_factory=list)  # data keys the weights were trained with (a Hub repo's)

    def line(self) -> str:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:LISTED]) + (f" and {len(keys) - LISTED} more" if len(keys) > LISTED else "")
        return (f"model.weights {self.source}: {self.loaded} tensors loaded"
                + (f"; adapted to the input channels: {some(self.adapted)}" if self.adapted else "")
                + (f"; new (the head for this class count): {some(self.new)}" if self.new else "")
                + (f"; ignored (not in this model): {some(self.ignored)}" if self.ignored else "")
                + (f"; trained with {', '.join(self.advice)} (its pretrained_cfg; set them to match)"
                   if self.advice else ""))

    def as_meta(self) -> dict:
        return asdict(self)


HUB_PREFIX = "hf-hub:"  # timm's own name for weights on the Hugging Face Hub
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's Hub repositories hold, preferred first


def hub_weights(source: str) -> tuple[Path, dict[str, Any]]:
    """`hf-hub:<repo>`'s weights file in the local Hugging Face cache ($HF_HOME, $HF_HUB_CACHE),
    and its repository's `pretrained_cfg` (timm's config.json: mean, std, crop_pct, input
    size), {} if it has none. Never a download: a file not cached is one line naming it."""
    from huggingface_hub import constants as hub
    from huggingface_hub import try_to_load_from_cache

    repo = source.removeprefix(HUB_PREFIX)
    if not repo or repo.count("/") != 1:
        raise CheckpointError(f"model.weights={source}: expected hf-hub:<owner>/<model>, "
                              "e.g. hf-hub:timm/resnet18.a1_in1k")
    found = next((p for name in HUB_FILES if isinstance(p := try_to_load_from_cache(repo, name), str)), None)
    if found is None:
        raise CheckpointError(f"model.weights={source}: not in the local Hugging Face cache ({hub.HF_HUB_CACHE}); "
                              f"dist-train never downloads: fetch it once where there is a network "
                              f"(`hf download {repo}`) into that cache")
    config = try_to_load_from_cache(repo, "config.json")
    try:
        pretrained = json.loads(Path(config).read_text()).get("pretrained_cfg", {}) if isinstance(config, str) else {}
    except (OSError, ValueError, AttributeError):
        pretrained = {}
    return Path(found), pretrained if isinstance(pretrained, dict) else {}


def weights_path(source: str | Path) -> Path:
    """Where `model.weights` is: a file or a checkpoint directory, or the cached file of
    `hf-hub:<repo>`. A source that is not there is one line naming it (start_run asks before it
    makes the run directory)."""
    path = hub_weights(str(source))[0] if str(source).startswith(HUB_PREFIX) else Path(source)
    if not path.exists():
        raise CheckpointError(f"model.weights: {path} not found (a .safetensors or .pth file, or a run's best/)")
    return path


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, a torch state-dict file, a model checkpoint or the
    local Hugging Face cache (`hf-hub:<repo>`)."""
    path = weights_path(source)
    if path.is_dir():
        return load_model_checkpoint(path)[0]
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"model.weights: {path} is not a readable safetensors file ({exc})") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"model.weights: {path}: expected .safetensors, {', '.join(TORCH_SUFFIXES)} "
                              "or a checkpoint directory")
    _check_declared_sizes(path)
    try:
        # Tensors and plain containers only: a pickle that would build other objects (and so
        # could run code) is refused by the loader before anything of it runs.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"model.weights: {path} holds more than tensors and is refused unread "
                              f"(torch.load weights_only: {reason})") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"model.weights: {path} is not a readable torch file ({exc})") from None
    return _state_dict_in(loaded, path)


def _check_declared_sizes(path: Path) -> None:
    """torch.save writes a zip whose records are stored, not compressed: what its records
    declare is about the file's own size. Far more is a zip bomb (a 1.3 MB file that inflates
    a pickle of 1 GiB), refused before torch.load inflates it. (Legacy non-zip files are
    read by torch.load's own bounded reader.)"""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"model.weights: {path} is not a readable torch file ({exc})") from None
    size = path.stat().st_size
    if declared > 2 * size + (1 << 20):
        raise CheckpointError(f"model.weights: {path}: its records declare {declared:,} bytes inside a file of "
                              f"{size:,} (a zip bomb?); refused unread")


def _state_dict_in(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a file that holds a state dict, or a training checkpoint wrapping one."""
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"model.weights: {path} holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def load_pretrained(model: nn.Module, source: str | Path, data: DataConfig | None = None) -> WeightsReport:
    """Load `source` into `model` in place (see the module docstring). With `data`, the report
    names where a Hub repository's pretrained_cfg differs from the run's normalization."""
    weights = read_weights(source)
    own = model.state_dict()
    head = head_prefix(model)
    report = WeightsReport(str(source))
    chosen: dict[str, torch.Tensor] = {}
    first_conv = _first_conv_weight(model)
    for key, target in own.items():
        if key not in weights:
            report.new.append(key)
            continue
        value = weights[key]
        if target.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"model.weights: {source}: {key} holds {str(value.dtype).removeprefix('torch.')} "
                                  f"values, the model's are {str(target.dtype).removeprefix('torch.')} "
                                  "(quantized or not weights at all)")
        if value.shape == target.shape:
            chosen[key] = value
        elif key == first_conv and _only_channels_differ(value, target):
            chosen[key] = adapt_input_conv(value, target.shape[1])
            report.adapted.append(key)
        elif head and key.startswith(head):
            report.new.append(key)  # another class count: the head starts anew
        else:
            raise CheckpointError(f"model.weights: {source}: {key} has shape {tuple(value.shape)}, the model "
                                  f"needs {tuple(target.shape)} (weights of another architecture?)")
    # BatchNorm's step counters are absent from some files and unused with a momentum set.
    missing_backbone = [k for k in report.new if not (head and k.startswith(head))
                        and not k.endswith("num_batches_tracked")]
    if missing_backbone:
        raise CheckpointError(f"model.weights: {source} lacks {missing_backbone[0]}"
                              + (f" and {len(missing_backbone) - 1} more" if len(missing_backbone) > 1 else "")
                              + " (weights of another architecture?)")
    report.ignored = sorted(k for k in weights if k not in own)
    report.loaded = len(chosen)
    model.load_state_dict(chosen, strict=False)
    if data is not None and str(source).startswith(HUB_PREFIX):
        report.advice = _pretrained_cfg_advice(hub_weights(str(source))[1], data)
    return report


def _pretrained_cfg_advice(pretrained: dict[str, Any], data: DataConfig) -> list[str]:
    """The data keys the weights were trained with, where the run's differ (timm's
    pretrained_cfg): offered in the log line, not applied (the config says what runs)."""
    offered = {"data.mean": pretrained.get("mean"), "data.std": pretrained.get("std"),
               "data.crop_pct": pretrained.get("crop_pct"), "data.interpolation": pretrained.get("interpolation")}
    current = {"data.mean": data.mean, "data.std": data.std, "data.crop_pct": data.crop_pct,
               "data.interpolation": data.interpolation}
    return [f"{key}={list(value) if isinstance(value, list | tuple) else value}" for key, value in offered.items()
            if value is not None and (list(value) if isinstance(value, list | tuple) else value) != current[key]]


def _first_conv_weight(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    return None


def _only_channels_differ(value: torch.Tensor, target: torch.Tensor) -> bool:
    same_filters = value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]
    return value.dim() == target.dim() == 4 and same_filters


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-conv weight for `in_channels` inputs, as timm's adapt_input_conv makes it: to one
    channel, the sum over the given ones (a gray image is then seen as RGB with equal values);
    to more, the filters repeated and scaled so that the response stays the same."""
    have = weight.shape[1]
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // have)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (have / in_channels)
