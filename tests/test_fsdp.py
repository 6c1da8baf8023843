"""FSDP2 (train.parallel=fsdp / hsdp): real 2-process `accelerate launch` runs over gloo that
train as DDP does, reduce once per optimizer step, and keep the checkpoint guarantees (bitwise
resume after SIGKILL, resume on one process, a DDP checkpoint resumed under FSDP)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_train.errors import ConfigError
from dist_train.runtime.fsdp import _mesh

from .conftest import DIGITS_CONFIG, REPO, run_cli
from .test_distributed import accelerate_launch
from .test_resume import run_killed_at, val_records, weights

pytestmark = pytest.mark.slow

# A ViT of two blocks on the digits, with what FSDP must carry: drop path (random per step),
# activation checkpointing, layer decay and a head LR, a backbone frozen for the first half
# epoch, clipping of the sharded gradients, accumulation over 2 micro-batches, checkpoints
# every 5 steps (11 steps an epoch: 2 processes x 2 x 32).
VIT = ("model.name=timm/vit_tiny_patch16_224",
       "model.kwargs={img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, drop_path_rate: 0.1}",
       "model.grad_checkpointing=true", "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05",
       "sched.warmup_epochs=0.2",
       "optim.layer_decay=0.8", "optim.head_lr_mult=2", "model.freeze=backbone", "model.freeze_epochs=0.5",
       "train.clip_grad_norm=1.0", "train.grad_accum_steps=2", "train.epochs=2", "train.checkpoint_every_steps=5",
       "train.keep_checkpoints=10", "train.progress_bar=false", "train.log_every_steps=1", "tracking.wandb=false",
       "tracking.plots=false",
       "model.channels_last=false")  # the digits config's NHWC layout: FSDP2 shards contiguous weights only
STEPS = 2 * 1438 // 128


def without_key_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with the attention keys' bias (the middle third of timm's `attn.qkv.bias`) set
    to zero. It has no gradient in exact arithmetic (softmax ignores a shift common to a query's
    scores), so what it gets is rounding, which differs with the summation order (reduce-scatter
    against all-reduce, 4 micro-batches against 2 x 2, one CPU against another), and AdamW makes
    steps of up to the LR's size out of it; it changes no output of the model."""
    out = dict(state)
    for name, value in state.items():
        if name.endswith("attn.qkv.bias"):
            out[name] = value.clone()
            out[name].view(3, -1)[1] = 0
    return out


def vit_args(digits_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "dist_train", "train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}",
            f"data.val={digits_dir}", f"train.output_dir={out}", *VIT, *extra]


def test_fsdp_trains_like_ddp_with_one_reduce_scatter_per_optimizer_step(tmp_path):
    """dist-train's train_step under DDP, FSDP, FSDP with activation checkpointing, HSDP and
    FSDP in bf16, from the same weights and data (benchmarks/fsdp_check.py): accumulation 2, 4 steps."""
    result = accelerate_launch(str(REPO / "benchmarks" / "fsdp_check.py"), "--out", str(tmp_path),
                               "--modes", "ddp,fsdp,fsdp-ac,hsdp,fsdp-bf16", "--steps", "4", "--accum", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    ddp = load_file(str(tmp_path / "ddp.safetensors"))
    for mode in ("fsdp", "fsdp-ac", "hsdp"):
        sharded = load_file(str(tmp_path / f"{mode}.safetensors"))
        assert set(sharded) == set(ddp)
        for name, value in ddp.items():
            assert torch.allclose(sharded[name], value, atol=1e-5, rtol=0), (mode, name)
    checkpointed, plain = (load_file(str(tmp_path / f"{mode}.safetensors")) for mode in ("fsdp-ac", "fsdp"))
    assert all(torch.allclose(checkpointed[k], plain[k], atol=1e-6, rtol=0) for k in plain)
    for rank in range(2):
        report = json.loads((tmp_path / f"fsdp-rank{rank}.json").read_text())
        # No reduce-scatter on the first micro-step of each optimizer step; on the last, one for
        # each sharded unit (the 2 blocks and the root).
        assert report["per_micro_step"] == [0, 3] * 4
        held, full = report["bytes"], json.loads((tmp_path / f"ddp-rank{rank}.json").read_text())["bytes"]
        assert sum(held.values()) <= 0.55 * sum(full.values())
        assert full["params"] == 4 * report["parameters"]  # DDP: every fp32 parameter, here
    initial = load_file(str(tmp_path / "initial.safetensors"))
    moved = sum((initial[k] - v).abs().sum() for k, v in ddp.items())
    assert moved > 0.1  # trained, not two copies of the init
    # bf16 parameters and compute, fp32 reduction and master weights: the same steps, give or
    # take bf16's rounding (1.7% of the distance the weights moved, here).
    bf16 = load_file(str(tmp_path / "fsdp-bf16.safetensors"))
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert sum((bf16[k] - v).abs().sum() for k, v in ddp.items()) < 0.1 * moved
    assert json.loads((tmp_path / "fsdp-bf16-rank0.json").read_text())["per_micro_step"] == [0, 3] * 4


def test_hsdp_shard_groups_must_divide_the_processes():
    with pytest.raises(ConfigError, match="shard groups of 3 processes do not divide the 2 processes"):
        _mesh("hsdp", torch.device("cpu"), 2, 3)


@pytest.mark.parametrize(("option", "says"), [
    ("train.ema_decay=0.99", "train.ema_decay under train.parallel=fsdp"),
    ("train.compile=true", "train.compile under train.parallel=fsdp"),
    ("model.sync_batchnorm=true", "model.sync_batchnorm under train.parallel=fsdp"),
    ("model.channels_last=true", "use model.channels_last=false, or train.parallel=ddp"),
    ("train.mixed_precision=fp16", "train.mixed_precision=fp16 under train.parallel=fsdp: FSDP's mixed precision "
                                   "here is bf16 (no sharded loss scaling); use train.mixed_precision=bf16"),
])
def test_what_fsdp_does_not_do_is_refused_in_one_line(option, says, digits_dir, tmp_path):
    result = run_cli(*vit_args(digits_dir, tmp_path / "run", "train.parallel=fsdp", option)[2:])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and says in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # refused before the run started


@pytest.fixture(scope="module")
def vit_runs(digits_dir, tmp_path_factory):
    """Uninterrupted 2-process runs under FSDP and under DDP, and a copy of the FSDP one killed
    with SIGKILL after its step-15 checkpoint (epoch 1, step 4 of 11)."""
    base = tmp_path_factory.mktemp("fsdp")
    runs = {"base": base}
    for name, parallel in (("fsdp", "fsdp"), ("ddp", "ddp")):
        result = accelerate_launch(*vit_args(digits_dir, base / name, f"train.parallel={parallel}"))
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = base / name
        runs[f"{name}-stdout"] = result.stdout
    run_killed_at(15, vit_args(digits_dir, base / "killed", "train.parallel=fsdp"), base / "killed")
    runs["killed"] = base / "killed"
    return runs


def test_fsdp_runs_as_ddp_does_end_to_end(vit_runs, digits_dir):
    assert "FSDP: 2 blocks and the root sharded over 2 processes" in vit_runs["fsdp-stdout"]
    assert "2 process(es) on cpu (MULTI_CPU), mixed precision" in vit_runs["ddp-stdout"]  # a timm model under DDP
    fsdp, ddp = without_key_bias(weights(vit_runs["fsdp"])), without_key_bias(weights(vit_runs["ddp"]))
    assert set(fsdp) == set(ddp)
    assert all(torch.allclose(fsdp[k], v, atol=1e-5, rtol=0) for k, v in ddp.items())
    for ours, theirs in zip(val_records(vit_runs["fsdp"]), val_records(vit_runs["ddp"]), strict=True):
        assert ours["step"] == theirs["step"]
        assert ours["val/acc"] == pytest.approx(theirs["val/acc"], abs=1e-3)
    # best/ holds the whole model: the single-process eval reads it as it reads DDP's.
    best = json.loads((vit_runs["fsdp"] / "best" / "meta.json").read_text())
    records = val_records(vit_runs["fsdp"])
    assert records[-1]["val/loss"] < records[0]["val/loss"] - 0.05  # it learns (22 steps: a ViT starts slowly)
    single = run_cli("eval", "--checkpoint", str(vit_runs["fsdp"] / "best"), "--data", str(digits_dir), "--json")
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads(single.stdout.strip().splitlines()[-1])["val/acc"] == pytest.approx(best["metrics"]["val/acc"])


def test_sigkill_then_resume_under_fsdp_is_bitwise_identical(vit_runs, digits_dir):
    resumed = vit_runs["base"] / "resumed"
    shutil.copytree(vit_runs["killed"], resumed)
    result = accelerate_launch(*vit_args(digits_dir, resumed, "train.parallel=fsdp", "train.resume=auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    # From step 15, or a later checkpoint the run completed before the kill reached it.
    resumed_at = int(re.search(r"resuming from \S+ at epoch \d+, step (\d+)", result.stdout).group(1))
    assert 15 <= resumed_at < STEPS
    reference, ours = weights(vit_runs["fsdp"]), weights(resumed)
    assert set(reference) == set(ours) and all(torch.equal(reference[k], ours[k]) for k in reference)
    assert val_records(resumed) == val_records(vit_runs["fsdp"])
    last = f"checkpoints/step-{STEPS:08d}/optimizer.safetensors"  # the moments too, whole and bitwise
    theirs, mine = load_file(str(vit_runs["fsdp"] / last)), load_file(str(resumed / last))
    assert set(theirs) == set(mine) and all(torch.equal(theirs[k], mine[k]) for k in theirs)


def test_an_fsdp_checkpoint_resumes_on_one_process(vit_runs, digits_dir):
    resumed = vit_runs["base"] / "resumed-1"
    shutil.copytree(vit_runs["killed"], resumed)
    # One thread, as each rank had: the 2 -> 1 tolerance of tests/test_resume.py.
    result = run_cli(*vit_args(digits_dir, resumed, "train.parallel=fsdp", "train.resume=auto")[2:],
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "1 process(es)" in result.stdout and "train.grad_accum_steps 2 -> 4" in result.stdout
    reference, ours = without_key_bias(weights(vit_runs["fsdp"])), without_key_bias(weights(resumed))
    for name, value in reference.items():
        assert torch.allclose(ours[name], value, rtol=1e-4, atol=1e-5), name


def test_a_ddp_checkpoint_resumes_under_fsdp(vit_runs, digits_dir):
    resumed = vit_runs["base"] / "ddp-to-fsdp"
    shutil.copytree(vit_runs["ddp"], resumed)
    for later in ("best", "last", *(f"checkpoints/step-{s:08d}" for s in range(20, STEPS + 1))):
        shutil.rmtree(resumed / later, ignore_errors=True)  # as if it had stopped after step 15
    result = accelerate_launch(*vit_args(digits_dir, resumed, "train.parallel=fsdp", "train.resume=auto"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "FSDP: 2 blocks" in result.stdout and "step 15" in result.stdout
    reference, ours = without_key_bias(weights(vit_runs["ddp"])), without_key_bias(weights(resumed))
    assert all(torch.allclose(ours[k], v, atol=1e-5, rtol=0) for k, v in reference.items())
