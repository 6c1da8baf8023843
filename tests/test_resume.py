"""Fault tolerance: SIGKILL and resume (same and other process count), SIGTERM, bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_train.checkpoint import find_resumable, load_model_checkpoint, load_resumable, sha256_file
from dist_train.errors import CheckpointError
from dist_train.runtime.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED
from dist_train.training.tracking import read_metrics

from .conftest import DIGITS_CONFIG, REPO, kill_tree, run_cli
from .test_distributed import CPU_DDP, accelerate_launch, free_port

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 1438 // 64  # 2 processes x 32, or 1 process x 2 accumulation x 32


def train_args(digits_dir: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "dist_train", "train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}",
        f"data.val={digits_dir}", f"train.output_dir={out}", "model.name=small_cnn_gn", "train.epochs=2",
        "train.checkpoint_every_steps=5", "train.progress_bar=false", "tracking.wandb=false",
        "tracking.plots=false", "train.log_every_steps=1", *extra,
    ]


def val_records(run: Path) -> list[dict]:
    """Validation records without their timing fields."""
    return [{k: v for k, v in r.items() if k in ("epoch", "step") or k.startswith(("val/", "val_ema/"))}
            for r in read_metrics(run / "metrics.jsonl") if "val/acc" in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before the expected checkpoint"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


# The training recipe's options, each with state or randomness a resume must restore exactly:
# per-sample RandAugment and erasing, mixup/cutmix, an EMA of the weights monitored for best/,
# the k best checkpoints, validation mid-epoch, a backbone frozen for 33 steps (the resume from
# step 30 crosses the unfreeze), and balanced sampling of the 1:50 imbalanced digits (conftest's
# `imbalanced_digits`) drawn anew each epoch, in epochs as long as the whole digits set's; and
# the published recipes' options: a timm ViT built from model.kwargs with drop path (random per
# step), trained at 12 px and validated at 16 (dynamic_img_size), repeated augmentation (2
# copies, one per rank), BCE with a target threshold on the mixed targets, timm's LAMB (its
# state has a per-group step tensor), the EMA updated every 4 steps (the kill at step 30
# falls between two updates), progressive resizing from 8 to 12 px whose crop changes mid-epoch
# one step before the kill (8 -> 10 px at step 30) and one step after it (10 -> 12 px at
# step 32), and flip test-time augmentation in every validation; and knowledge distillation
# from a teacher with batch norm (`recipe`), which sees the mixed images at the progressive sizes.
RECIPE = ("data.augment=randaugment", "data.random_erasing=0.25", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
          "train.ema_decay=0.9", "train.ema_warmup=true", "train.monitor=val_ema/f1_macro", "train.keep_best=2",
          "train.val_every_steps=8", "model.freeze=backbone", "model.freeze_epochs=1.5",
          "data.sampling=balanced", "data.samples_per_epoch=1437",
          "model.name=timm/vit_tiny_patch16_224", "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, "
          "num_heads: 2, drop_path_rate: 0.1, dynamic_img_size: true, dynamic_img_pad: true}", "data.image_size=12",
          "data.val_crop_size=16", "data.repeated_augment=2", "loss.name=bce", "loss.bce_target_threshold=0.2",
          "optim.name=lamb", "optim.lr=0.005", "optim.weight_decay=0.02", "train.ema_every_steps=4",
          "data.progressive_start_size=8", "data.progressive_step=2", "data.progressive_start_epoch=1.233",
          "data.progressive_end_epoch=1.4603", "data.tta=flip")


def recipe(teacher: Path) -> tuple[str, ...]:
    """RECIPE, distilled from conftest's `recipe_teacher`."""
    return (*RECIPE, "distill.teacher=small_cnn", f"distill.teacher_weights={teacher}", "distill.alpha=0.3",
            "distill.temperature=2")


def recipe_reference_run(digits_dir: Path, out: Path, teacher: Path) -> None:
    """The uninterrupted 2-process run with every recipe option (conftest's `recipe_reference`)."""
    result = accelerate_launch(*train_args(digits_dir, out, *recipe(teacher)))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "distilling from small_cnn" in result.stdout


def run_killed_at_step_30(data: str | Path, out: Path, teacher: Path, *extra: str,
                          env: dict[str, str] | None = None) -> None:
    """The reference's run, killed with SIGKILL (launcher and ranks) once it has checkpointed step 30."""
    run_killed_at(30, train_args(data, out, *recipe(teacher), *extra), out, env)  # epoch 1, step 8 of 22


def run_killed_at(step: int, train: list[str], out: Path, env: dict[str, str] | None = None) -> None:
    """`accelerate launch` (2 processes) of these `dist-train train` arguments, killed with
    SIGKILL (launcher and ranks) once the run has checkpointed `step`."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(CPU_DDP), "--main_process_port", str(free_port()), *train]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    process = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out / "checkpoints" / f"step-{step:08d}", process)
    finally:
        # The launcher and both ranks, like a power cut. Not the launcher's process group: torchrun
        # starts each rank in a session of its own, and ranks outlive a killed launcher.
        kill_tree(process)
        process.wait()


@pytest.fixture(scope="module")
def runs(imbalanced_digits, recipe_reference, recipe_teacher, tmp_path_factory):
    """An uninterrupted 2-process run, and a copy of another killed with SIGKILL mid-epoch,
    both with every recipe option on."""
    base = tmp_path_factory.mktemp("resume")
    killed = base / "killed"
    run_killed_at_step_30(imbalanced_digits, killed, recipe_teacher)
    return {"reference": recipe_reference, "killed": killed, "base": base, "recipe": recipe(recipe_teacher),
            "teacher": recipe_teacher}


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(runs, imbalanced_digits):
    resumed = runs["base"] / "resumed-2"
    shutil.copytree(runs["killed"], resumed)
    assert not (resumed / "last").exists()
    result = accelerate_launch(*train_args(imbalanced_digits, resumed, *runs["recipe"], "train.resume=auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stdout and "at epoch 1" in result.stdout
    reference, ours = weights(runs["reference"]), weights(resumed)
    assert set(reference) == set(ours)
    assert all(torch.equal(reference[k], ours[k]) for k in reference)  # bitwise
    assert val_records(resumed) == val_records(runs["reference"])
    teacher = json.loads((resumed / "last" / "meta.json").read_text())["distill"]
    assert teacher["sha256"] == sha256_file(runs["teacher"])  # recorded, and the same file it began with
    # The moving average (last checkpoint), best/ (the average's weights) and the top-2, bitwise.
    last = f"checkpoints/step-{2 * STEPS_PER_EPOCH:08d}"
    top = sorted(p.name for p in (runs["reference"] / "top").iterdir())
    assert len(top) == 2 and sorted(p.name for p in (resumed / "top").iterdir()) == top
    for name in (f"{last}/ema.safetensors", "best/model.safetensors", *(f"top/{t}/model.safetensors" for t in top)):
        theirs, mine = load_file(str(runs["reference"] / name)), load_file(str(resumed / name))
        assert set(theirs) == set(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs), name


def test_the_recipe_validates_mid_epoch_and_keeps_the_best_of_its_moving_average(runs):
    """Validation every 8 steps and at each epoch's end (22 steps), of the model and of its
    moving average; best/ and the top 2 are the average's best by val_ema/f1_macro."""
    records = [r for r in read_metrics(runs["reference"] / "metrics.jsonl") if "val/acc" in r]
    assert [r["step"] for r in records] == [8, 16, 22, 24, 32, 40, 44]
    assert [r["step"] for r in records if "train/epoch_loss" in r] == [22, 44]  # an epoch's figures at its end
    assert all(r["val_ema/loss"] != r["val/loss"] for r in records)
    # The training crop of each step (train records every step): 8 px, then 10 from the 30th
    # step on (the killed run checkpointed after it), 12 from the 32nd (the second after its resume).
    sizes = {r["step"]: r["train/image_size"] for r in read_metrics(runs["reference"] / "metrics.jsonl")
             if "train/loss" in r}
    assert [sizes[s] for s in range(27, 35)] == [8, 8, 8, 10, 10, 12, 12, 12]
    assert sizes[1] == 8 and sizes[44] == 12
    best = json.loads((runs["reference"] / "best" / "meta.json").read_text())
    ranked = sorted(records, key=lambda r: -r["val_ema/f1_macro"])  # stable: a tie keeps the earlier
    assert best["weights"] == "ema" and best["step"] == ranked[0]["step"]
    assert sorted(p.name for p in (runs["reference"] / "top").iterdir()) == sorted(
        f"step-{r['step']:08d}" for r in ranked[:2])


def test_resume_on_one_process_instead_of_two(runs, imbalanced_digits):
    resumed = runs["base"] / "resumed-1"
    shutil.copytree(runs["killed"], resumed)
    # One thread, as each of the two ranks had (torchrun sets OMP_NUM_THREADS=1): with two, the
    # CPU kernels sum in another order and the weights drift by float rounding alone (3.9e-5
    # after 14 steps here); with one, the resumed run is bitwise the reference.
    result = run_cli(*train_args(imbalanced_digits, resumed, *runs["recipe"], "train.resume=auto")[2:],
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "train.grad_accum_steps 1 -> 2" in result.stdout  # the global batch of 64 is kept
    reference, ours = weights(runs["reference"]), weights(resumed)
    for name, value in reference.items():
        assert torch.allclose(ours[name], value, rtol=1e-4, atol=1e-5), name
    for ref, got in zip(val_records(runs["reference"]), val_records(resumed), strict=True):
        assert got["step"] == ref["step"]
        for key in ("val/acc", "val/f1_macro", "val/loss", "val/auroc_macro", "val_ema/loss", "val_ema/acc"):
            assert got[key] == pytest.approx(ref[key], abs=1e-4), key


def _processes_of_session(sid: int) -> list[str]:
    """The command lines of the live processes in session `sid` (zombies left out)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_like_sigterm_and_leaves_no_process(digits_dir, tmp_path, presses):
    """Ctrl-C as a terminal sends it: SIGINT to every process of the foreground group (the
    training process, its fork server, resource tracker and DataLoader workers). Once: the
    step ends, a resumable checkpoint is saved, one line, exit 130. Twice: out at once."""
    out = tmp_path / "run"
    cmd = [sys.executable, *train_args(digits_dir, out, "train.checkpoint_every_steps=null", "data.num_workers=2")]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < 3:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(presses):
            os.killpg(process.pid, signal.SIGINT)
            time.sleep(0.2)  # two signals closer together may reach Python's handler as one
        _, stderr = process.communicate(timeout=60)
    finally:
        kill_tree(process)
    # A second press that lands while the interpreter shuts down (it has restored SIGINT's
    # default action by then) ends the process by the signal itself: a shell reports 130 too.
    accepted = {EXIT_INTERRUPTED} if presses == 1 else {EXIT_INTERRUPTED, -signal.SIGINT}
    assert EXIT_INTERRUPTED == 130 and process.returncode in accepted, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    if presses == 1:
        (line,) = stderr.strip().splitlines()
        assert line.startswith("dist-train: stopped by Ctrl-C (SIGINT) after step")
        (checkpoint,) = (out / "checkpoints").iterdir()
        assert find_resumable(out) == checkpoint
    else:  # the second press may come before the step ends, or after its checkpoint was saved
        lines = stderr.strip().splitlines()
        twice = "dist-train: interrupted twice: stopped at once, without a new checkpoint"
        assert set(lines) - {twice} == {line for line in lines if line.startswith("dist-train: stopped by Ctrl-C")}
        assert len(lines) <= 2 and (twice in lines or process.returncode == -signal.SIGINT), stderr
    deadline = time.monotonic() + 10  # helpers notice their training process is gone
    while (left := _processes_of_session(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left


def test_sigterm_checkpoints_at_a_step_boundary_and_exits_75(digits_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *train_args(digits_dir, out, "train.checkpoint_every_steps=null")]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < 3:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED == 75, stderr[-3000:]
    assert "stopped by signal 15 (SIGTERM)" in stderr
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "state.json").read_text())
    step = state["position"]["global_step"]
    assert 3 <= step < 2 * (1438 // 32) and checkpoints[0].name == f"step-{step:08d}"
    assert state["position"]["step_in_epoch"] == step % (1438 // 32)
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) <= step
    finished = run_cli(*train_args(digits_dir, out, "train.resume=auto", "train.epochs=1")[2:])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (out / "last" / "model.safetensors").is_file()


def test_truncated_checkpoint_is_skipped_with_a_warning(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["reference"], run)
    newest, previous = sorted((run / "checkpoints").iterdir(), reverse=True)[:2]
    weights_file = newest / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000044.*truncated"):
        assert find_resumable(run) == previous
    with pytest.raises(CheckpointError, match="missing, truncated or altered"):
        load_resumable(newest, rank=0)


def test_a_pickle_that_would_run_code_is_refused(runs, tmp_path):
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.pt"
    torch.save({"weight": _RunsCode(str(marker))}, payload)
    best = tmp_path / "best"
    shutil.copytree(runs["reference"] / "best", best)
    meta = json.loads((best / "meta.json").read_text())
    shutil.copy(payload, best / "model.safetensors")
    meta.pop("weights_sha256")  # even without the hash check, the format check refuses it
    (best / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model_checkpoint(best)
    resumable = tmp_path / "step-00000044"
    shutil.copytree(sorted((runs["reference"] / "checkpoints").iterdir())[-1], resumable)
    shutil.copy(payload, resumable / "optimizer.safetensors")
    state = json.loads((resumable / "state.json").read_text())
    from dist_train.checkpoint import sha256_file

    state["files"]["optimizer.safetensors"] = sha256_file(resumable / "optimizer.safetensors")
    (resumable / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="unreadable tensors"):
        load_resumable(resumable, rank=0)
    assert not marker.exists()


class _RunsCode:
    """Unpickling this would create a file: the kind of payload a checkpoint must never run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_resume_on_fewer_processes_is_reported_as_it_ran(digits_dir, tmp_path):
    """Started on 2 processes, resumed on 1: the run's record says what ran (accumulation 2,
    global batch 64, the LR scaled to it), and the report's LR curve is the logged LRs."""
    from dist_train.training.report import load_run, lr_curve

    out = tmp_path / "run"
    # A step schedule depends on the step alone, so the second launch may add an epoch.
    args = ["--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
            f"train.output_dir={out}", "model.name=small_cnn_gn", "train.progress_bar=false",
            "tracking.wandb=false", "train.log_every_steps=1", "optim.lr=0.1", "optim.lr_base_batch=32",
            "sched.name=step", "sched.step_size_epochs=1", "sched.gamma=0.5", "sched.warmup_epochs=0"]
    first = accelerate_launch("-m", "dist_train", "train", *args, "train.epochs=1", "tracking.plots=false")
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_cli("train", *args, "train.epochs=2", "tracking.plots=true", "train.resume=auto")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "train.grad_accum_steps 1 -> 2" in second.stdout

    for meta in (json.loads((out / name / "meta.json").read_text()) for name in ("best", "last")):
        if meta["step"] > STEPS_PER_EPOCH:  # saved by the second launch
            assert meta["world_size"] == 1
            assert meta["layout"] == {"world_size": 1, "grad_accum_steps": 2, "batch_size": 32,
                                      "global_batch": 64, "steps_per_epoch": STEPS_PER_EPOCH, "epochs": 2,
                                      "base_lr": pytest.approx(0.2)}
    launches = json.loads((out / "last" / "meta.json").read_text())["launches"]
    assert [(launch["step"], launch["world_size"], launch["grad_accum_steps"]) for launch in launches] == \
        [(0, 2, 1), (STEPS_PER_EPOCH, 1, 2)]
    summary = (out / "summary.md").read_text()
    assert "1 process(es), global batch 64 (32 per process x 2 accumulation), base LR 0.2" in summary
    assert (f"launches: from step 0, 2 process(es) x 1 accumulation; from step {STEPS_PER_EPOCH}, "
            "1 process(es) x 2 accumulation") in summary

    logged = {r["step"]: r["lr"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r}
    assert sorted(logged) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    steps, lrs = lr_curve(load_run(out))
    curve = dict(zip(steps, lrs, strict=True))
    assert logged[1] == pytest.approx(0.2) and logged[2 * STEPS_PER_EPOCH] == pytest.approx(0.05)
    for step, lr in logged.items():
        assert curve[step] == pytest.approx(lr, rel=1e-12), step
    assert (out / "lr.png").is_file()


def test_resume_auto_refuses_a_run_whose_checkpoints_are_all_unusable(runs, digits_dir, tmp_path):
    """Starting over would overwrite best/ and metrics.jsonl (and under Slurm, every requeue would)."""
    run = tmp_path / "run"
    shutil.copytree(runs["reference"], run)
    for checkpoint in (run / "checkpoints").iterdir():
        weights_file = checkpoint / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = run_cli(*train_args(digits_dir, run, "train.resume=auto")[2:])
    assert result.returncode == 2, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("dist-train: error: ") and "none of its 2 checkpoints is usable" in last_line
    assert "step-00000044" in last_line and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing lost or changed


def test_a_second_run_into_a_directory_in_use_is_refused(digits_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *train_args(digits_dir, out, "train.checkpoint_every_steps=null", "train.epochs=30")]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < 2:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with ThreadPoolExecutor(max_workers=2) as pool:  # both attempts at once
            seconds = list(pool.map(lambda resume: run_cli(*train_args(digits_dir, out, resume)[2:]),
                                    ("train.resume=auto", "train.resume=null")))
        for second in seconds:
            assert second.returncode == 2, second.stderr[-3000:]
            assert f"is in use by another run (process {first.pid})" in second.stderr.strip().splitlines()[-1]
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        kill_tree(first)
    assert first.returncode == EXIT_PREEMPTED, stderr[-3000:]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # the first run's records alone, none interleaved
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 30  # the first run's config
