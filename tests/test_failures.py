"""A rank that dies or raises ends the whole 2-process job promptly, its error shown once.

The bound (README, "Errors and exit codes"): the launcher notices a failed process within a
second and stops the others; a survivor blocked in a collective fails as soon as gloo sees
the dead peer's connection close, and torchrun kills any survivor that is still running
after its shutdown grace (30 s). Asserted here: under 60 s from the failure to the exit.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dist_train.data.tar_index import index_tar

from .conftest import DIGITS_CONFIG, REPO, kill_tree
from .test_distributed import accelerate_launch_command

pytestmark = [pytest.mark.slow, pytest.mark.alone]  # timed against a bound

BOUND_S = 60


@pytest.fixture
def launch():
    """Starts a 2-process training job; whatever of it still runs at the test's end is killed."""
    jobs: list[subprocess.Popen] = []

    def start(run_dir: Path, data: Path, *overrides: str) -> subprocess.Popen:
        cmd, env = accelerate_launch_command(
            "-m", "dist_train", "train", "--config", str(DIGITS_CONFIG), f"data.train={data}", f"data.val={data}",
            f"train.output_dir={run_dir}", "tracking.wandb=false", "train.epochs=50",
            "train.checkpoint_every_steps=5", *overrides)
        jobs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True))
        return jobs[-1]

    yield start
    for job in jobs:
        kill_tree(job)


def _wait_for_checkpoint(run_dir: Path, job: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint yet"
        time.sleep(0.2)


def _rank_pids(job: subprocess.Popen) -> list[int]:
    """The two training processes: children of the launcher running `dist_train train`."""
    out = subprocess.run(["pgrep", "-P", str(job.pid), "-f", "dist_train train"], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def test_a_killed_rank_ends_the_job_within_the_bound(launch, digits_dir, tmp_path):
    job = launch(tmp_path / "run", digits_dir)
    _wait_for_checkpoint(tmp_path / "run", job)
    rank_pids = _rank_pids(job)
    assert len(rank_pids) == 2
    killed = time.monotonic()
    os.kill(rank_pids[1], signal.SIGKILL)  # what the OOM killer or a lost node does
    output, _ = job.communicate(timeout=BOUND_S + 30)
    elapsed = time.monotonic() - killed
    print(f"job exited {elapsed:.1f} s after a rank was killed")
    assert job.returncode != 0
    assert elapsed < BOUND_S, output[-3000:]
    assert "Root Cause" in output and "SIGKILL" in output  # the launcher names the first failure
    # The survivor says one line, not a traceback of the collective it was waiting in.
    assert "[rank0]: Traceback" not in output, output[-3000:]
    assert "another process of the job failed" in output


def test_a_rank_that_raises_ends_the_job_with_its_error_shown_once(launch, digits_dir, tmp_path):
    """A sample whose image does not decode: the rank that reads it stops with the error."""
    data = tmp_path / "digits"
    data.mkdir()
    for item in digits_dir.iterdir():
        (data / item.name).write_bytes(item.read_bytes())
    shard = sorted(data.glob("train-*.tar"))[2]
    key, members = index_tar(str(shard))[100]
    ext = next(e for e in members if e != "cls")
    offset, size = members[ext]
    with open(shard, "r+b") as f:  # same length, so the tar stays well formed
        f.seek(offset)
        f.write(b"\x00" * size)
    # As if make-shards had packed an image that does not decode: dataset.json's sha256 is the
    # damaged shard's (else the shard would be refused, by its hash, before training starts).
    manifest = json.loads((data / "dataset.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["file"] == shard.name:
            entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (data / "dataset.json").write_text(json.dumps(manifest))

    started = time.monotonic()
    job = launch(tmp_path / "run", data, "train.epochs=3")
    output, _ = job.communicate(timeout=300)
    print(f"job exited after {time.monotonic() - started:.1f} s")
    assert job.returncode != 0
    error_lines = [line for line in output.splitlines() if "dist-train: error:" in line]
    assert len(error_lines) == 1, output[-3000:]
    assert str(shard) in error_lines[0] and key in error_lines[0]
    assert "is not a decodable image" in error_lines[0] and "Traceback" not in error_lines[0]
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output, output[-3000:]
