"""Resumable training state: save it at step boundaries, find the newest good one, load it.

A resumable checkpoint is a directory `RUN/checkpoints/step-<global step>/`:

    model.safetensors       the weights
    optimizer.safetensors   the optimizer's tensors (momentum buffers, Adam moments, ...)
    rng-rank<r>.json        the random states of rank r (Python, NumPy, torch CPU and CUDA)
    state.json              everything else: epoch and step, the data order, the optimizer's
                            hyperparameters and scalars, scheduler and grad-scaler state, the
                            best metric so far, and the SHA-256 of every file above

Nothing in it is pickled, so loading cannot run code. It is written under a temporary name
by all ranks (each its RNG file) and the main process (the rest), then renamed: a directory
with the final name is complete. Loading checks every hash; `find_resumable` walks back from
the newest to the first that passes, warning about each it skips.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_train.checkpoint import disk_errors_as_checkpoint_errors, fsync_path, sha256_file
from dist_train.data.order import OrderSpec
from dist_train.errors import CheckpointError

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "state.json"
STATE_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})$")


@dataclass
class TrainPosition:
    """Where training stands: the next optimizer step to take is `step_in_epoch` of `epoch`."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


@dataclass
class BestSoFar:
    value: float | None = None
    epoch: int = -1
    metrics: dict[str, float] | None = None


@dataclass
class ResumeState:
    position: TrainPosition
    order: OrderSpec
    best: BestSoFar
    world_size: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    model: dict[str, torch.Tensor]
    rng: dict[str, Any] | None  # this rank's, when the checkpoint has one for it
    path: Path


def checkpoint_dir(run_dir: Path, global_step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{global_step:08d}"


def save_resumable(accelerator, run_dir: Path, position: TrainPosition, order: OrderSpec, best: BestSoFar,
                   model, optimizer, schedule, keep: int) -> Path:
    """Collective: every rank calls it at the same step boundary."""
    final = checkpoint_dir(run_dir, position.global_step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with disk_errors_as_checkpoint_errors(final, tmp):
        _write_json(tmp / f"rng-rank{accelerator.process_index}.json", _rng_state())
    model_state = accelerator.get_state_dict(model)  # collective for sharded models; cheap here
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with disk_errors_as_checkpoint_errors(final, tmp):
            weights = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
            save_file(weights, str(tmp / "model.safetensors"))
            tensors, optimizer_json = _split_optimizer_state(optimizer.state_dict())
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
            files = sorted(p.name for p in tmp.iterdir())
            state = {
                "version": STATE_VERSION,
                "position": asdict(position),
                "order": asdict(order),
                "best": asdict(best),
                "world_size": accelerator.num_processes,
                "optimizer": optimizer_json,
                "scheduler": schedule.state_dict(),
                "scaler": scaler,
                "files": {name: sha256_file(tmp / name) for name in files},
            }
            _write_json(tmp / STATE_NAME, state)
            for name in [*files, STATE_NAME]:
                fsync_path(tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(final.parent)
        _rotate(run_dir / CHECKPOINTS_DIR, keep)
    accelerator.wait_for_everyone()
    return final


def find_resumable(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files pass their hashes; None if there is none."""
    for path in _complete(run_dir / CHECKPOINTS_DIR)[::-1]:
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
    return None


def verify(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / STATE_NAME).read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / STATE_NAME}: unreadable ({exc})") from None
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('version')}, expected {STATE_VERSION}")
    for name, digest in files.items():
        file = path / name
        if not file.is_file() or sha256_file(file) != digest:
            raise CheckpointError(f"{file}: missing, truncated or altered")
    return state


def load_resumable(path: Path, rank: int) -> ResumeState:
    state = verify(path)
    try:
        model = load_file(str(path / "model.safetensors"))
        optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable tensors ({exc})") from None
    rng_file = path / f"rng-rank{rank}.json"
    return ResumeState(
        position=TrainPosition(**state["position"]),
        order=OrderSpec(**state["order"]),
        best=BestSoFar(**state["best"]),
        world_size=state["world_size"],
        optimizer=_join_optimizer_state(optimizer_tensors, state["optimizer"]),
        scheduler=state["scheduler"],
        scaler=state["scaler"],
        model=model,
        rng=json.loads(rng_file.read_text()) if rng_file.is_file() else None,
        path=path,
    )


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to safetensors (`<param index>.<name>`), everything else to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in saved["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": saved["param_groups"]}


def _complete(directory: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary ones start with a dot)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _rotate(directory: Path, keep: int) -> None:
    for old in _complete(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))
