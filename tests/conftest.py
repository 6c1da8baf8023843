"""Shared fixtures: real shards of sklearn's digits, and a way to run the real command line."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dist_train.data import sources
from dist_train.data.shard_writer import make_shards

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits_cpu.yaml"


@pytest.fixture(scope="session", autouse=True)
def node_index_dir(tmp_path_factory) -> Path:
    """The training indexes of the suite's datasets (data/sample_index.py) in its own directory,
    for every process the tests start too, not left in the machine's temporary directory."""
    directory = tmp_path_factory.mktemp("node-index")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIST_TRAIN_INDEX_DIR", str(directory))
        yield directory


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The digits dataset as make-shards writes it: 6 train shards, 2 val shards."""
    out = tmp_path_factory.mktemp("digits")
    make_shards(sources.digits(), out, val_fraction=0.2, seed=0, shard_size=256, source_name="digits")
    return out


RARE_DIGITS = range(5, 10)  # imbalanced_digits keeps 1 training image in 50 of these


@pytest.fixture(scope="session")
def imbalanced_digits(tmp_path_factory) -> Path:
    """Digits with classes 5-9 cut to 2% of their training images (about 145 : 3), the
    validation set left whole (every class about 36, the same images as `digits_dir`'s)."""
    out = tmp_path_factory.mktemp("imbalanced")
    make_shards(sources.digits(), out, shard_size=64, train_class_fraction={c: 0.02 for c in RARE_DIGITS},
                source_name="digits")
    return out


@pytest.fixture(scope="session")
def recipe_teacher(tmp_path_factory) -> Path:
    """The weights of a small CNN (with batch norm: its statistics must not move) that the
    recipe's runs distill from: seeded, untrained, a teacher all the same."""
    import torch
    from safetensors.torch import save_file

    from dist_train.recipe.models import create_model

    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("teacher") / "small_cnn.safetensors"
    save_file(create_model("small_cnn", 10, 1).state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def recipe_reference(imbalanced_digits, recipe_teacher, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of the imbalanced digits with balanced sampling and every
    recipe option on (test_resume.py), which resumed runs, local or from remote shards, must
    match bitwise."""
    from .test_resume import recipe_reference_run

    out = tmp_path_factory.mktemp("recipe") / "reference"
    recipe_reference_run(imbalanced_digits, out, recipe_teacher)
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None):
    """Run `python -m dist_train ARGS` in a fresh process, as a user would."""
    # No W&B credentials: runs log offline into their run directory, never to the network.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_API_KEY": "", "NETRC": os.devnull, **(env or {})}
    return run_reaped([sys.executable, "-m", "dist_train", *args], cwd=cwd or REPO, env=full_env, timeout=timeout)


def run_reaped(cmd: list[str], *, timeout: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=...)`, except that a timeout
    kills every process the command started, not only the command: a launcher's ranks (torchrun
    starts each in a session of its own) would otherwise outlive a hung test and load the
    machine under every test after it."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and all its descendants (ranks, DataLoader workers, wandb's service)."""
    if process.poll() is not None:
        return  # ended and reaped: its pid may already belong to another process
    try:
        root = psutil.Process(process.pid)
        doomed = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in doomed:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
