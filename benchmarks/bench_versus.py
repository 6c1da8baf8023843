"""`dist-train bench`'s figures against a plain webdataset loop (benchmarks/plain_loop.py):
start-up to the first optimizer step (1 process and 2-process DDP), the process tree's memory
while training, and steady training throughput.

Measured from a process that has not imported torch: PSS divides a page shared by k
processes among them, wherever they run, so a measuring process that maps libtorch itself
would take its share of every measured tree's libraries, more of a tree of two processes than
of one of four, and bend the ratio. `dist-train bench` therefore runs these first, before its
own process imports torch (cli.py), and makes their shards with a `make-shards` command.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIG = REPO / "configs" / "digits_cpu.yaml"
LAUNCH = REPO / "launch"
PLAIN_LOOP = REPO / "benchmarks" / "plain_loop.py"


def measure(quick: bool) -> dict[str, float]:
    """The figures' sides (`startup_s` and `plain_startup_s`, ...) on fresh digits shards."""
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "digits"
        subprocess.run([sys.executable, "-m", "dist_train", "make-shards", "--source", "digits", "--out",
                        str(shards), "--shard-size", "256"], check=True, capture_output=True)
        return versus_plain_loop(shards, Path(tmp), *((1, 1, 2) if quick else (5, 3, 5)))


def versus_plain_loop(shards: Path, tmp: Path, startup_rounds: int, train_rounds: int, epochs: int) -> dict[str, float]:
    """`dist-train train` with the shipped digits config (tracking as shipped: wandb offline,
    plots) beside benchmarks/plain_loop.py, the same data, model, batch and workers, each run
    as its own command. Start-up: command start to the first optimizer step, alternating
    rounds, medians. Then alternating training runs: the peak over the run of the PSS summed
    over each command's process tree (proportional: a page shared by k processes counts 1/k,
    so the tree's sum is what it really holds), and the steady images/s, the median over the
    epochs after the first of each epoch's training images/s (from its start, the first
    batch's wait included, to its last step; validation excluded), in both."""
    from dist_train.config import load_config

    workers = load_config(REPO_CONFIG).data.num_workers
    counter = itertools.count()

    def ours(epochs: int, *extra: str) -> tuple[list[str], Path]:
        out = tmp / f"ours-{next(counter)}"
        return [sys.executable, "-m", "dist_train", "train", "--config", str(REPO_CONFIG), f"data.train={shards}",
                f"data.val={shards}", f"train.output_dir={out}", f"train.epochs={epochs}", *extra], out

    def plain(epochs: int) -> list[str]:
        return [sys.executable, str(PLAIN_LOOP), "--data", str(shards), "--epochs", str(epochs),
                "--workers", str(workers)]

    def ours_ddp() -> list[str]:
        port = str(29600 + os.getpid() % 300)
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu-ddp.yaml"),
                "--main_process_port", port, "-m", "dist_train", *ours(1, "--profile-startup")[0][3:]]

    def plain_ddp() -> list[str]:
        port = str(29300 + os.getpid() % 300)
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                *plain(1)[1:]]

    startup: dict[str, list[float]] = {"ours": [], "plain": [], "ours_ddp": [], "plain_ddp": []}
    for i in range(startup_rounds):
        rounds = [("ours", ours(1, "--profile-startup")[0], "start-up"), ("plain", plain(1), '"first_step"'),
                  ("ours_ddp", ours_ddp(), "start-up"), ("plain_ddp", plain_ddp(), '"first_step"')]
        for name, cmd, marker in rounds if i % 2 == 0 else rounds[::-1]:
            startup[name].append(_seconds_to_line(cmd, marker))

    pss: dict[str, list[float]] = {"ours": [], "plain": []}
    rates: dict[str, list[float]] = {"ours": [], "plain": []}
    last_epoch = epochs - 1
    for i in range(train_rounds):
        for name in ("ours", "plain") if i % 2 == 0 else ("plain", "ours"):
            if name == "ours":
                cmd, out = ours(epochs)
                log = out / "metrics.jsonl"
                peak_kb = _peak_training_pss_kb(cmd, log, "val/loss", last_epoch)
                records = [json.loads(line) for line in log.read_text().splitlines()]
            else:
                stdout = tmp / f"plain-{next(counter)}.jsonl"
                peak_kb = _peak_training_pss_kb(plain(epochs), stdout, "val_acc", last_epoch,
                                                stdout_to_log=True)
                records = [json.loads(line) for line in stdout.read_text().splitlines() if line.startswith("{")]
            pss[name].append(peak_kb / 1024)
            key = "train/images_per_sec" if name == "ours" else "train_images_per_sec"
            rates[name] += [r[key] for r in records if key in r and r["epoch"] > 0]
    return {"startup_s": statistics.median(startup["ours"]), "plain_startup_s": statistics.median(startup["plain"]),
            "ddp_startup_s": statistics.median(startup["ours_ddp"]),
            "plain_ddp_startup_s": statistics.median(startup["plain_ddp"]),
            "tree_pss_mb": statistics.median(pss["ours"]), "plain_tree_pss_mb": statistics.median(pss["plain"]),
            "images_per_sec": statistics.median(rates["ours"]),
            "plain_images_per_sec": statistics.median(rates["plain"])}


def _seconds_to_line(cmd: list[str], marker: str) -> float:
    """Seconds from starting `cmd` to the first line of its stdout holding `marker`; then the
    command and every process it started are killed (the rest of the run is not needed)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+") as errors:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
                                   start_new_session=True)
        try:
            for line in process.stdout:
                if marker in line:
                    return time.perf_counter() - start
        finally:
            kill_tree(process)
        errors.seek(0)
        raise RuntimeError(f"{' '.join(cmd)} ended before printing {marker!r}:\n{errors.read()[-3000:]}")


def _peak_training_pss_kb(cmd: list[str], log: Path, key: str, last_epoch: int, stdout_to_log: bool = False) -> int:
    """Run `cmd` to its end; the peak of its process tree's summed PSS in kB while it trains,
    until its JSON-lines `log` (its stdout, with `stdout_to_log`) holds the last epoch's
    validation (a record with `key`): what a run does after training, its report, is not
    training."""
    with tempfile.TemporaryFile("w+") as errors, open(log if stdout_to_log else os.devnull, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=errors, text=True)
        peak = 0
        while process.poll() is None and not _has_record(log, last_epoch, key):
            peak = max(peak, tree_pss_kb(process.pid))
            time.sleep(0.1)
        process.wait()
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{errors.read()[-3000:]}")
    return peak


def _has_record(path: Path, epoch: int, key: str) -> bool:
    """Whether the JSON lines of `path` hold a record of this epoch with `key`."""
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        if line.startswith("{") and line.endswith("}"):
            record = json.loads(line)
            if key in record and record.get("epoch") == epoch:
                return True
    return False


def process_tree(pid: int) -> list:
    """A process and all its descendants (psutil.Process), or [] if it has ended."""
    import psutil

    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_pss_kb(pid: int) -> int:
    """The PSS (proportional set size) of a process and all its descendants, summed, in kB
    (Linux: /proc/PID/smaps_rollup). Unlike RSS, a page shared by k processes counts 1/k in
    each, so the sum is the memory the tree holds."""
    total = 0
    for p in process_tree(pid):
        try:
            rollup = Path(f"/proc/{p.pid}/smaps_rollup").read_text()
        except OSError:  # ended meanwhile
            continue
        total += sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total


def kill_tree(process: subprocess.Popen) -> None:
    import psutil

    tree = process_tree(process.pid)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    process.wait()
    psutil.wait_procs(tree, timeout=10)
