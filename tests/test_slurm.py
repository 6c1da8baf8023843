"""Slurm: the per-node accelerate arguments, and real jobs on the local 2-node cluster.

The cluster tests need Debian's slurm-wlm and munge and root (`.ci/run` installs them); the
fixture starts `slurm/local-cluster.sh` when no cluster is running. Outside CI they are
skipped where Slurm is missing; in CI (CI=true) a missing cluster is a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dist_train.commands import slurm
from tests.conftest import DIGITS_CONFIG, REPO, run_cli

ALLOCATION_4X8 = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu[07-10]",
                  "SLURM_GPUS_ON_NODE": "8", "MAIN_PROCESS_ADDR": "10.1.2.7"}


@pytest.mark.parametrize("hostlist, hosts", [
    ("n1", ["n1"]),
    ("n[1-2]", ["n1", "n2"]),
    ("gpu[08-10,12],login1", ["gpu08", "gpu09", "gpu10", "gpu12", "login1"]),
    ("a[1-2]-ib,b7", ["a1-ib", "a2-ib", "b7"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("n[1-3,7],gpu[10-11]", ["n1", "n2", "n3", "n7", "gpu10", "gpu11"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert slurm.expand_hostlist(hostlist) == hosts
    if shutil.which("scontrol"):  # Slurm's own reading, the same hosts (where Slurm is installed and configured: CI)
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 or sorted(out.stdout.split()) == sorted(hosts), out.stderr
    assert sorted(slurm.job_hosts(hostlist)) == sorted(hosts)


@pytest.mark.parametrize("node_rank", [0, 3])
def test_four_nodes_of_eight_gpus_launch_32_processes(node_rank):
    env = {**ALLOCATION_4X8, "SLURM_NODEID": str(node_rank)}
    launch = slurm.node_launch_from_env(env, cuda_devices=0)  # the variable, not this machine, counts
    cmd = slurm.accelerate_command(launch, ["--config", "c.yaml", "optim.lr=0.4"])
    args = _options(cmd)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert args["--config_file"].endswith("launch/multi-node.yaml")
    assert args["--num_machines"] == "4"
    assert args["--num_processes"] == "32"
    assert args["--machine_rank"] == str(node_rank)
    assert args["--main_process_ip"] == "10.1.2.7"
    assert args["--main_process_port"] == str(20000 + 4242)
    assert args["--rdzv_backend"] == "static"
    assert cmd[-6:] == ["dist_train", "train", "--config", "c.yaml", "optim.lr=0.4", "train.resume=auto"]


def test_node_command_as_the_sbatch_task_prints_it():
    """`python -m dist_train slurm node --print`, the task slurm/train.sbatch runs, under a 4x8 allocation."""
    env = {**os.environ, **ALLOCATION_4X8, "SLURM_NODEID": "2"}
    done = subprocess.run([sys.executable, "-m", "dist_train", "slurm", "node", "--print", "--config", "c.yaml",
                           "train.resume=null"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.strip()
    assert printed.startswith("accelerate launch --config_file ")
    for expected in ("--num_machines 4", "--num_processes 32", "--machine_rank 2",
                     "--main_process_ip 10.1.2.7", "-m dist_train train --config c.yaml train.resume=null"):
        assert expected in printed
    assert "train.resume=auto" not in printed  # the user's choice stands


def test_cpu_nodes_run_the_gloo_config_with_processes_per_node():
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[1-2]",
           "MAIN_PROCESS_ADDR": "127.0.0.1", "MAIN_PROCESS_PORT": "29999", "PROCESSES_PER_NODE": "3"}
    args = _options(slurm.accelerate_command(slurm.node_launch_from_env(env, cuda_devices=0), []))
    assert args["--config_file"].endswith("launch/cpu-ddp.yaml")
    assert (args["--num_processes"], args["--machine_rank"], args["--main_process_port"]) == ("6", "1", "29999")


def test_node_outside_a_job_is_a_one_line_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([sys.executable, "-m", "dist_train", "slurm", "node", "--config", "c.yaml"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "not inside a Slurm job step" in done.stderr and "Traceback" not in done.stderr


def test_the_job_steps_are_hidden_subcommands_of_the_one_parser(tmp_path):
    shown = run_cli("--help")
    commands = re.search(r"\{(.*?)\}", shown.stdout).group(1).split(",")
    assert shown.returncode == 0 and "submit" in commands and "slurm" not in commands
    assert not re.search(r"^\s+slurm\s", shown.stdout, re.MULTILINE)  # nor among the commands listed
    run_dir = tmp_path / "run"
    for cmd in ([sys.executable, "-m", "dist_train", "slurm", "run-dir"],
                [sys.executable, "-m", "dist_train.slurm", "run-dir"]):  # the command of earlier releases
        done = subprocess.run([*cmd, "--config", str(DIGITS_CONFIG), f"train.output_dir={run_dir}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == str(run_dir), done.stderr
        bad = subprocess.run([*cmd, "--config", str(DIGITS_CONFIG), "train.epochz=3"],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.startswith("dist-train: error: ") and "epochz" in bad.stderr


def test_submit_dry_run_renders_the_sbatch_command(tmp_path):
    run_dir = tmp_path / "r50"
    done = run_cli("submit", "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00", "--dry-run",
                   "--config", str(REPO / "configs" / "imagenet_resnet50.yaml"), f"train.output_dir={run_dir}")
    assert done.returncode == 0, done.stderr
    cmd = done.stdout.split()
    assert cmd[0] == "sbatch"
    for option in ("--nodes=4", "--gpus-per-node=8", "--ntasks-per-node=1", "--time=24:00:00",
                   f"--output={run_dir}/logs/slurm-%j.out", "--job-name=r50"):
        assert option in cmd
    assert cmd[cmd.index(str(REPO / "slurm" / "train.sbatch")) + 1] == "--config"
    assert not run_dir.exists()  # a dry run touches nothing


def test_submit_checks_the_config_first(tmp_path):
    done = run_cli("submit", "--dry-run", "--config", str(DIGITS_CONFIG), "optim.lrr=0.1")
    assert done.returncode == 2 and "optim.lrr" in done.stderr


def test_sbatch_script_asks_for_the_warning_signal_and_requeue():
    script = (REPO / "slurm" / "train.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", script, re.M)
    assert "#SBATCH --requeue" in script and "scontrol requeue" in script
    assert subprocess.run(["bash", "-n", str(REPO / "slurm" / "train.sbatch")]).returncode == 0


def _options(cmd: list[str]) -> dict[str, str]:
    return {a: b for a, b in itertools.pairwise(cmd) if a.startswith("--")}


# ---------------------------------------------------------------- the real local cluster


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment for sbatch on the local 2-node cluster (started here if need be)."""
    available = shutil.which("slurmctld") and shutil.which("munged") and os.geteuid() == 0
    if not available:
        if os.environ.get("CI"):
            pytest.fail("Slurm is not installed: .ci/run installs slurm-wlm and munge")
        pytest.skip("needs root and Debian's slurm-wlm + munge (see slurm/local-cluster.sh)")
    started = subprocess.run(["bash", str(REPO / "slurm" / "local-cluster.sh"), "start"],
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    conf = re.search(r"SLURM_CONF=(\S+)", started.stdout).group(1)
    # The jobs run this interpreter's environment: sbatch passes PATH on.
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "SLURM_CONF": conf, "PATH": path, "WANDB_API_KEY": "", "PYTHONUNBUFFERED": "1"}


def _train_args(digits_dir: Path, run_dir: Path) -> list[str]:
    return ["--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
            "train.epochs=2", "train.checkpoint_every_steps=5", "tracking.plots=false",
            # Contiguous weights in every job: the FSDP job (FSDP2 shards no NHWC weights) is
            # compared tensor for tensor with the DDP one.
            "model.channels_last=false", f"train.output_dir={run_dir}"]


def _submit(env: dict, digits_dir: Path, run_dir: Path, *extra: str) -> int:
    done = subprocess.run([sys.executable, "-m", "dist_train", "submit", "--nodes", "2",
                           *_train_args(digits_dir, run_dir), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return int(re.search(r"Submitted batch job (\d+)", done.stdout).group(1))


def _job_field(env: dict, job_id: int, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], env=env, capture_output=True,
                         text=True, timeout=30).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else ""


def _wait_for_end(env: dict, job_id: int, run_dir: Path, timeout: float = 480) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_field(env, job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    _dump_stacks(run_dir)
    subprocess.run(["scancel", str(job_id)], env=env)
    # The batch log, then the node logs, latest last: CI shows the end of the output.
    logs = sorted((run_dir / "logs").glob("slurm-*")) + sorted((run_dir / "logs").glob("job-*"))
    pytest.fail(f"job {job_id} still {state} after {timeout} s; its logs, with the stacks of its processes:\n"
                + "\n".join(f"== {p}\n{p.read_text()[-6000:]}" for p in logs))


def _dump_stacks(run_dir: Path) -> None:
    """Have the job's training processes and their DataLoader workers print every thread's
    stack to their logs (SIGUSR2, see dist_train/runtime/preemption.py): where a job that hangs waits."""
    ranks = [p for p in psutil.process_iter(["cmdline"]) if _is_rank_of(p.info["cmdline"] or [], run_dir)]
    servers = [c for rank in ranks for c in rank.children() if "forkserver" in " ".join(c.cmdline())]
    workers = {w.pid for server in servers for w in server.children()}
    for pid in sorted({r.pid for r in ranks} | workers):  # one at a time: processes of a node share its log
        with contextlib.suppress(ProcessLookupError):  # a validation worker may have ended since
            os.kill(pid, signal.SIGUSR2)
        time.sleep(0.5)
    time.sleep(2)


def _is_rank_of(cmdline: list[str], run_dir: Path) -> bool:
    """A training process of the run (`python -u -m dist_train train ...`), not its launcher."""
    return (f"train.output_dir={run_dir}" in cmdline and "dist_train" in cmdline
            and not any("accelerate" in arg for arg in cmdline))


@pytest.fixture(scope="module")
def uninterrupted_run(slurm_env, digits_dir, tmp_path_factory) -> tuple[Path, int, str]:
    run_dir = tmp_path_factory.mktemp("slurm") / "uninterrupted"
    job = _submit(slurm_env, digits_dir, run_dir)
    return run_dir, job, _wait_for_end(slurm_env, job, run_dir)


@pytest.mark.slow
def test_two_node_job_trains_digits_with_world_size_two(uninterrupted_run):
    run_dir, job, state = uninterrupted_run
    logs = sorted((run_dir / "logs").iterdir())
    assert state == "COMPLETED", "\n".join(p.read_text()[-3000:] for p in logs)
    assert [p.name for p in logs] == [f"job-{job}.0.node0.log", f"job-{job}.0.node1.log", f"slurm-{job}.out"]
    node0, node1 = (p.read_text() for p in logs[:2])
    assert "node 0/2" in node0 and "node 1/2" in node1
    assert "2 process(es) on cpu (MULTI_CPU)" in node0  # the main process prints for the job
    meta = json.loads((run_dir / "best" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["metrics"]["val/acc"] >= 0.9
    # One writer: one best checkpoint, no half-written copies beside it.
    assert sorted(p.name for p in run_dir.iterdir() if "best" in p.name) == ["best"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val/acc" in r] == [0, 1]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two runs of the job, and a first one in the fixture if run alone
def test_warned_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one_also_under_fsdp(
        slurm_env, digits_dir, uninterrupted_run, tmp_path):
    """The time-limit warning, the checkpoint, the requeue and the resume, of a job that also
    shards its model (train.parallel=fsdp: the 2 nodes' processes hold half of it each). On 2
    CPU processes over gloo FSDP trains bitwise as DDP does (a sum of two gradients is the same
    in either order, the update is elementwise; tests/test_fsdp.py), so the uninterrupted DDP
    job is its reference, tensor for tensor: what a requeue changes, or FSDP, shows. (DDP's own
    SIGKILL and resume, bitwise: tests/test_resume.py.) It logs to wandb (offline), TensorBoard
    and MLflow: the requeued job is one run in each, every record in it once."""
    from safetensors.torch import load_file

    from .test_tracking_e2e import ALL_TRACKERS, assert_one_run_per_tracker

    run_dir = tmp_path / "fsdp"
    job = _submit(slurm_env, digits_dir, run_dir, "train.parallel=fsdp", *ALL_TRACKERS)
    first = _warned_and_requeued(slurm_env, job, run_dir)
    assert "FSDP: 8 blocks and the root sharded over 2 processes" in first
    stopped_at = int(re.search(r"stopped by signal 10 \(SIGUSR1\) after step (\d+)", first).group(1))
    assert_one_run_per_tracker(run_dir, stopped_at, epochs=2, stopped_cleanly=True)
    reference = uninterrupted_run[0]
    for name in ("best", "last"):
        ours, theirs = (load_file(str(d / name / "model.safetensors")) for d in (run_dir, reference))
        assert set(ours) == set(theirs) and all(ours[k].equal(theirs[k]) for k in theirs), name
    best = run_dir / "best"
    val_acc = json.loads((best / "meta.json").read_text())["metrics"]["val/acc"]
    evaluated = run_cli("eval", "--checkpoint", str(best), "--data", str(digits_dir), "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["val/acc"] == val_acc
    exported = run_cli("export", "--checkpoint", str(best), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    val_shards = [str(p) for p in sorted(digits_dir.glob("val-*.tar"))]
    predicted = run_cli("predict", "--checkpoint", str(tmp_path / "m.onnx"), "--input", *val_shards,
                        "--out", str(tmp_path / "p.csv"))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 359


def _warned_and_requeued(env: dict, job: int, run_dir: Path) -> str:
    """Warn the job as its time limit would once it has checkpointed, and check it was requeued,
    resumed and completed; its first start's log of node 0."""
    deadline = time.monotonic() + 300
    while not list((run_dir / "checkpoints").glob("step-*")):  # mid-run: after a first checkpoint
        assert time.monotonic() < deadline and _job_field(env, job, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.5)
    # What `#SBATCH --signal=B:USR1@180` does before the time limit, now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=env, check=True)
    state = _wait_for_end(env, job, run_dir)
    batch_log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", batch_log
    assert _job_field(env, job, "Restarts") == "1"
    assert "requeueing job" in batch_log and "(start 2)" in batch_log
    first = (run_dir / "logs" / f"job-{job}.0.node0.log").read_text()
    second = (run_dir / "logs" / f"job-{job}.1.node0.log").read_text()
    stopped_at = int(re.search(r"stopped by signal 10 \(SIGUSR1\) after step (\d+)", first).group(1))
    assert f"resuming from {run_dir}/checkpoints/step-{stopped_at:08d}" in second
    assert stopped_at < 44  # 2 epochs of 22 steps: it was stopped mid-run
    return first
