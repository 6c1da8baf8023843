"""Resumable checkpoints: the whole training state at a step boundary; find the newest good one.

A resumable checkpoint is a directory `RUN/checkpoints/step-<global step>/`:

    model.safetensors, meta.json  a model checkpoint (checkpoint/model.py): eval and predict take it
    <member>.safetensors          the tensors of each other member of the state that has any
                                  (optimizer.safetensors: momentum buffers, Adam moments, ...)
    <member>-rank<r>.json         what differs per rank r (rng-rank<r>.json: its random states)
    state.json                    every member's other values under its name (position, order,
                                  best, optimizer, scheduler, scaler), the world size, and the
                                  SHA-256 of every file above

The members are those of the training state (`TrainState`, training/state.py), which this
module knows only as a `ResumableState`. Nothing is pickled, so loading cannot
run code. Written through checkpoint/atomic.py by all ranks (each its own files) and the
main process (the rest); loading checks every hash first; `find_resumable` walks back from
the newest checkpoint to the first that passes, warning about each it skips.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dist_train.checkpoint.atomic import AtomicDirectory, check_files, file_hashes
from dist_train.checkpoint.background import CheckpointWriter
from dist_train.checkpoint.model import META_NAME, WEIGHTS_NAME, save_tensors, write_model_files
from dist_train.errors import CheckpointError

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "state.json"
STATE_VERSION = 1  # unchanged since the first release: older checkpoints still resume
_RESERVED = ("version", "world_size", "files")
_NAME = re.compile(r"^step-(\d{8,})$")


class ResumableState(Protocol):
    """What a resumable checkpoint stores: members by name, tensors and JSON (training/state.py's
    `TrainState` is one). Declared here so that checkpoints never import the training floor."""

    step: int

    def state_dict(self) -> dict[str, dict[str, Any] | None]: ...

    def rank_state_dict(self) -> dict[str, dict[str, Any]]: ...


@dataclass
class SavedState:
    """A verified resumable checkpoint, read back: `TrainState.resume_from` takes it."""

    members: dict[str, dict[str, Any] | None]
    rank_members: dict[str, dict[str, Any]]  # this rank's, when the checkpoint has them
    world_size: int
    path: Path


def checkpoint_dir(run_dir: Path, global_step: int) -> Path:
    return run_dir / CHECKPOINTS_DIR / f"step-{global_step:08d}"


def save_resumable(accelerator: Accelerator, run_dir: Path, state: ResumableState, meta: dict[str, Any],
                   keep: int, writer: CheckpointWriter | None = None) -> Path:
    """Collective: every rank calls it at the same step boundary. `meta`: the model
    checkpoint's meta.json; the newest `keep` checkpoints are kept. With `writer`, the main
    process writes the tensors on the writer's thread (checkpoint/background.py): the
    checkpoint counts once its rename is done there, `writer.wait()` waits for it."""
    target = AtomicDirectory(checkpoint_dir(run_dir, state.step))
    if accelerator.is_main_process:
        if writer is not None:
            writer.wait()  # the one before is complete (or its error said) before this one starts
        with target.writing():
            target.create()
    accelerator.wait_for_everyone()
    with target.writing():
        for name, values in state.rank_state_dict().items():
            _write_json(target.tmp / f"{name}-rank{accelerator.process_index}.json", values)
    members = state.state_dict()  # every rank: the model's may be a collective for sharded models
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        world_size = accelerator.num_processes

        def write(members: dict[str, dict[str, Any] | None], meta: dict[str, Any]) -> None:
            with target.writing():
                weights_sha256 = write_model_files(target.tmp, members.pop("model"), meta)
                index: dict[str, Any] = {"version": STATE_VERSION, "world_size": world_size}
                for name, values in members.items():
                    index[name] = _save_member(target.tmp, name, values)
                # The weights were hashed for meta.json just now: not read and hashed a second time.
                others = sorted(p.name for p in target.tmp.iterdir() if p.name != WEIGHTS_NAME)
                index["files"] = dict(sorted({WEIGHTS_NAME: weights_sha256,
                                              **file_hashes(target.tmp, others)}.items()))
                _write_json(target.tmp / STATE_NAME, index)
                target.commit()
            _rotate(run_dir / CHECKPOINTS_DIR, keep)

        if writer is None:
            write(members, meta)
        else:  # a snapshot: training changes the originals from the next step on
            writer.submit(functools.partial(write, _snapshot(members), copy.deepcopy(meta)))
    accelerator.wait_for_everyone()
    return target.final


def _snapshot(members: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any] | None]:
    """The members as they are now: tensors copied to host memory, other values deep-copied."""
    def copied(value: Any) -> Any:
        return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)

    return {name: None if values is None else {k: copied(v) for k, v in values.items()}
            for name, values in members.items()}


def find_resumable(run_dir: Path) -> Path | None:
    """The newest complete checkpoint whose files pass their hashes; None if the run has none.

    A run whose checkpoints all fail (corrupted, or of another format) is refused: starting it
    over would overwrite its best/ and metrics.jsonl, and under Slurm every requeue would.
    """
    problems = []
    for path in _complete(run_dir / CHECKPOINTS_DIR)[::-1]:
        try:
            verify(path)
        except CheckpointError as exc:
            problems.append(exc)
            continue
        for problem in problems:  # the newer ones, passed over
            warnings.warn(f"skipping checkpoint {problem}", stacklevel=2)
        return path
    if problems:
        raise CheckpointError(
            f"{run_dir / CHECKPOINTS_DIR}: none of its {len(problems)} checkpoints is usable (the newest: "
            f"{problems[0]}); nothing was changed: restore them, or move the directory aside to start over"
        )
    return None


def verify(path: Path, hashes: bool = True) -> dict[str, Any]:
    """state.json of a resumable checkpoint whose every file passes its hash (`hashes=False`:
    its state.json alone is checked, for a checkpoint whose files were hashed just before)."""
    try:
        index = json.loads((path / STATE_NAME).read_text())
        files = index["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / STATE_NAME}: unreadable ({exc})") from None
    if index.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {index.get('version')}, expected {STATE_VERSION}")
    _check_index(index, path)
    if hashes:
        check_files(path, files, STATE_NAME)
    return index


REQUIRED_ORDER_KEYS = {"seed", "global_batch", "partitions", "window"}
SAMPLING_KEYS = {"sampling", "samples_per_epoch", "repeats"}  # newer than the others: may be missing
SAMPLING_MODES = ("uniform", "balanced", "sqrt", "weights")


def _check_index(index: dict[str, Any], path: Path) -> None:
    """The parts of state.json that decide where and how a run continues, checked before use:
    a damaged or altered one is skipped like a file that fails its hash, never a traceback."""

    def count(value: Any, minimum: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

    position, order = index.get("position"), index.get("order")
    problems = [
        not isinstance(index.get("files"), dict) or not all(isinstance(v, str) for v in index["files"].values()),
        not count(index.get("world_size"), 1),
        not isinstance(position, dict) or not count(position.get("global_step"), 0),
        # sampling, samples_per_epoch, repeats: since data.sampling and data.repeated_augment.
        not isinstance(order, dict) or not REQUIRED_ORDER_KEYS <= set(order) <= REQUIRED_ORDER_KEYS | SAMPLING_KEYS,
        isinstance(order, dict) and order.get("sampling", "uniform") not in SAMPLING_MODES,
        isinstance(order, dict) and not count(order.get("samples_per_epoch", 0), 0),
        isinstance(order, dict) and not count(order.get("repeats", 1), 1),
        isinstance(order, dict) and not all(count(order.get(k), 1) for k in ("global_batch", "partitions", "window")),
        isinstance(order, dict) and not count(order.get("seed"), 0),
        isinstance(order, dict) and count(order.get("partitions"), 1) and count(order.get("global_batch"), 1)
        and order["global_batch"] % order["partitions"] != 0,
        not isinstance(best := index.get("best", {}), dict)
        or not isinstance(best.get("value"), float | int | None) or isinstance(best.get("value"), bool),
    ]
    if any(problems):
        raise CheckpointError(f"{path / STATE_NAME}: damaged or altered (world size, position or data order "
                              "missing or out of range)")


def saved_meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's meta.json; None if it has none."""
    try:
        meta = json.loads((path / META_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / META_NAME}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_NAME}: damaged or altered (not a JSON object)")
    return meta


def saved_config(path: Path) -> dict[str, Any] | None:
    """The config a resumable checkpoint was written with (its meta.json); None if it has none."""
    meta = saved_meta(path)
    if meta is None:
        return None
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / META_NAME}: damaged or altered (no config object)")
    return config


def load_resumable(path: Path, rank: int, hashes_checked: bool = False) -> SavedState:
    """The checkpoint's state, for `TrainState.resume_from`. Its files are hashed first unless
    `hashes_checked` (a checkpoint's tensors can be gigabytes: hash them once, not twice)."""
    index = verify(path, hashes=not hashes_checked)
    members: dict[str, dict[str, Any] | None] = {k: v for k, v in index.items() if k not in _RESERVED}
    for file in index["files"]:
        if file.endswith(".safetensors"):
            name = file.removesuffix(".safetensors")
            members[name] = {**(members.get(name) or {}), **_load_tensors(path / file)}
    rank_members = {}
    for file in index["files"]:
        name, _, which = file.removesuffix(".json").rpartition("-rank")
        if file.endswith(".json") and name and which == str(rank):
            rank_members[name] = json.loads((path / file).read_text())
    return SavedState(members, rank_members, index["world_size"], path)


def _save_member(directory: Path, name: str, values: dict[str, Any] | None) -> dict[str, Any] | None:
    """Write a member's tensors as `<name>.safetensors`; return the rest, for state.json."""
    if values is None:
        return None
    tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    if tensors:
        save_tensors(tensors, directory / f"{name}.safetensors")
    return {k: v for k, v in values.items() if k not in tensors}


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file.parent}: unreadable tensors in {file.name} ({exc})") from None


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

