"""Run under `accelerate launch` (2 CPU processes): train a small timm ViT through dist-train's
own `train_step` with K-step accumulation, from the same weights and data: under DDP, under
FSDP (dist_train/runtime/fsdp.py), under FSDP with activation checkpointing, under HSDP
(shard groups of one process, replicated: the reduction becomes an all-reduce), and under FSDP
with the bf16 policy of train.mixed_precision=bf16.
Writes, per mode, the final weights (gathered whole, rank 0), the reduce-scatters FSDP made at
each micro-step, and this process's bytes of parameters, gradients and optimizer state as the
optimizer step sees them (the local shards under FSDP). tests/test_fsdp.py runs it on a tiny
ViT; `benchmarks/bench_fsdp.py` on a ViT-S/16 for the bench's figure `fsdp_state_vs_ddp`.

    accelerate launch --config_file launch/cpu-ddp.yaml benchmarks/fsdp_check.py --out DIR

The data layout is data/order.py's: at optimizer step s, rank r's micro-batch k holds samples
[s*G + (r*K + k)*b, ... + b) of the epoch, where G = W*K*b.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import islice
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's dist_train, as the bench's
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.distributed.fsdp._fully_shard import _fsdp_collectives
from torch.distributed.tensor import DTensor

from dist_train.config import TrainConfig
from dist_train.recipe.models import create_model, enable_grad_checkpointing
from dist_train.runtime.accelerator import make_accelerator
from dist_train.runtime.fsdp import full_state_dict, shard_model
from dist_train.training.engine import train_step
from dist_train.training.progress import TrainProgress

MODES = ("ddp", "fsdp", "fsdp-ac", "hsdp", "fsdp-bf16")
CLASSES = 5


def make_model(args) -> torch.nn.Module:
    set_seed(0)
    kwargs = {"img_size": args.image_size, "patch_size": args.patch_size, "embed_dim": args.dim,
              "depth": args.depth, "num_heads": args.heads}
    return create_model("timm/vit_tiny_patch16_224", CLASSES, 3, kwargs)


def local_bytes(tensors) -> int:
    """Bytes this process holds of these tensors: a sharded one's local shard only."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    args = parser.parse_args()
    accelerator = make_accelerator(TrainConfig(grad_accum_steps=args.accum, cpu=True))
    for mode in args.modes.split(","):
        train(accelerator, args, Path(args.out), mode)


def train(accelerator, args, out: Path, mode: str) -> None:
    world, rank, k, b = accelerator.num_processes, accelerator.process_index, args.accum, args.batch
    global_batch = world * k * b
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(args.steps * global_batch, 3, args.image_size, args.image_size, generator=gen)
    labels = torch.randint(0, CLASSES, (len(images),), generator=gen)

    model = make_model(args)
    if mode == "fsdp-ac":
        enable_grad_checkpointing(model, "timm/vit_tiny_patch16_224")
    if accelerator.is_main_process and mode == "ddp":
        save_file(model.state_dict(), str(out / "initial.safetensors"))
    if mode != "ddp":
        shard_model(model, "hsdp" if mode == "hsdp" else "fsdp", accelerator.device, world,
                    1 if mode == "hsdp" else world, "bf16" if mode == "fsdp-bf16" else "no")
        optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05))
    else:
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3,
                                                                        weight_decay=0.05))
    held: dict[str, int] = {}

    def measure(opt, *_):  # at the step: gradients reduced (sharded under FSDP), state allocated after the first
        params = [p for group in opt.param_groups for p in group["params"]]
        held.update(params=local_bytes(params), grads=local_bytes(p.grad for p in params),
                    optimizer_state=local_bytes(v for s in opt.state.values() for v in s.values()
                                                if isinstance(v, torch.Tensor) and v.ndim))

    optimizer.optimizer.register_step_post_hook(measure)

    reduce_scatters: list[int] = []
    original = _fsdp_collectives.DefaultReduceScatter.__call__

    def counting(self, *a, **kw):
        reduce_scatters.append(1)
        return original(self, *a, **kw)

    per_micro_step: list[int] = []

    def loader():
        for s in range(args.steps):
            for micro in range(k):
                start = s * global_batch + (rank * k + micro) * b
                before = len(reduce_scatters)
                yield images[start: start + b], labels[start: start + b]
                per_micro_step.append(len(reduce_scatters) - before)

    progress = TrainProgress(accelerator, show_bar=False)
    progress.start_epoch(0, args.steps)
    micro_batches = loader()
    _fsdp_collectives.DefaultReduceScatter.__call__ = counting
    try:
        for _ in range(args.steps):
            train_step(model, islice(micro_batches, k), torch.nn.CrossEntropyLoss(), optimizer, accelerator,
                       progress, clip_grad_norm=1.0)
        assert next(micro_batches, None) is None  # also counts the last micro-step's reduce-scatters
    finally:
        _fsdp_collectives.DefaultReduceScatter.__call__ = original
    state = full_state_dict(accelerator.unwrap_model(model))  # every rank: a collective under FSDP
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps({
        "per_micro_step": per_micro_step, "world_size": world, "bytes": held,
        "parameters": sum(v.numel() for v in make_model(args).parameters()),
    }))
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{mode}.safetensors"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
