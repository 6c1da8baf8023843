"""Model checkpoints (`RUN/best`, `RUN/last`): `model.safetensors` plus `meta.json`.

Weights are stored with safetensors (no pickle: loading cannot run code); `meta.json` holds
what inference needs (config, class names, metrics, how the run ran) and the weights'
SHA-256. Written and checked by checkpoint/atomic.py. A resumable checkpoint is a model
checkpoint with the rest of the training state beside it, so `eval` and `predict` take
either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_train.checkpoint.atomic import AtomicDirectory, check_files, resolve_dir, sha256_file
from dist_train.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.json"


def write_model_files(directory: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """`model.safetensors` and `meta.json` (with the weights' hash) into `directory`; the hash."""
    weights = directory / WEIGHTS_NAME
    save_tensors(state_dict, weights)
    digest = sha256_file(weights)
    (directory / META_NAME).write_text(json.dumps({**meta, "weights_sha256": digest}, indent=2) + "\n")
    return digest


def save_model_checkpoint(directory: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    target = AtomicDirectory(directory)
    with target.writing():
        write_model_files(target.create(), state_dict, meta)
        return target.commit()


def load_model_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = resolve_dir(directory, META_NAME)
    try:
        meta = json.loads((path / META_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / META_NAME}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_NAME}: not a JSON object")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    if meta.get("weights_sha256"):
        check_files(path, {WEIGHTS_NAME: meta["weights_sha256"]}, META_NAME)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    return state, meta


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors wants contiguous CPU tensors that do not share memory.
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
