"""Model checkpoints: `model.safetensors` plus `meta.json`, written atomically, loaded safely.

A checkpoint directory (e.g. `RUN/best`) is first written in full under a hidden temporary
name, with every file fsynced, and then renamed into place. The previous version is moved
aside before the rename and deleted after, so a crash at any moment leaves either the old
or the new checkpoint complete; `resolve_checkpoint_dir` finds the survivor.

Weights are stored with safetensors (no pickle: loading cannot run code) and `meta.json`
records their SHA-256, so a truncated or altered file is caught before it is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_train.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.json"


@contextlib.contextmanager
def disk_errors_as_checkpoint_errors(final: Path, tmp: Path) -> Iterator[None]:
    """A full disk or a read-only directory while writing `tmp`: drop the partial copy and
    say so in one line. Nothing has touched `final` yet, so the previous version stands."""
    try:
        yield
    except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as its own
        shutil.rmtree(tmp, ignore_errors=True)
        intact = " (the previous one there is intact)" if final.exists() else ""
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CheckpointError(f"could not write checkpoint {final}: {reason}{intact}") from None


def save_model_checkpoint(directory: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp")
    old = final.with_name(f".{final.name}.old")
    with disk_errors_as_checkpoint_errors(final, tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights = tmp / WEIGHTS_NAME
        # safetensors wants contiguous tensors that do not share memory.
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(weights))
        meta = {**meta, "weights_sha256": sha256_file(weights)}
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        for path in (weights, tmp / META_NAME):
            fsync_path(path)
    # From here on only renames, which need no space: the swap itself cannot run out of it.
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint_dir(directory: str | Path) -> Path:
    """The checkpoint directory, or the previous version if a save was cut off mid-swap."""
    final = Path(directory)
    if (final / META_NAME).is_file():
        return final
    old = final.with_name(f".{final.name}.old")
    if (old / META_NAME).is_file():
        return old
    raise CheckpointError(f"no checkpoint at {final} (expected {WEIGHTS_NAME} and {META_NAME})")


def load_model_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = resolve_checkpoint_dir(directory)
    try:
        meta = json.loads((path / META_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / META_NAME}: unreadable ({exc})") from None
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    expected = meta.get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: contents do not match meta.json (truncated or altered)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    return state, meta


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
