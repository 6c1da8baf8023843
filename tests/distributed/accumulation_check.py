"""Run under `accelerate launch` (2 CPU processes): train a model without batch-norm with
K-step accumulation through dist-train's own `train_step`, count the gradient
all-reduces DDP makes at each micro-step, and save the final parameters (rank 0) and each
rank's moving average of them (dist_train/recipe/ema.py, updated as the loop does). Then the
same again distilled from a teacher (`--teacher` names its prefix `kd-`): its gradient-free
forward must add no all-reduce, and its loss must average over W x K x b as the task loss does.

The data layout is the one data/order.py gives: at optimizer step s, rank r's micro-batch k
holds samples [s*G + (r*K + k)*b, ... + b) of the epoch, where G = W*K*b.
"""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dist_train.config import DistillConfig, SchedConfig, TrainConfig
from dist_train.recipe.distill import Teacher, TeacherIdentity
from dist_train.recipe.ema import WeightsEma
from dist_train.recipe.optim import Schedule
from dist_train.runtime.accelerator import make_accelerator
from dist_train.training.engine import train_step
from dist_train.training.progress import TrainProgress


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5),
    )


def make_data(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, 1, 8, 8, generator=gen), torch.randint(0, 5, (samples,), generator=gen)


def make_teacher() -> Teacher:
    """A teacher of another shape (with batch norm, whose statistics must not move)."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(6 * 6 * 6, 5))
    return Teacher(model, DistillConfig(teacher="test", alpha=0.4, temperature=2.0), TeacherIdentity("test", "", ""))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    accelerator = make_accelerator(TrainConfig(grad_accum_steps=args.accum, cpu=True))
    for prefix, teacher in (("", None), ("kd-", make_teacher())):
        train(accelerator, args, Path(args.out), prefix, teacher)


def train(accelerator, args, out: Path, prefix: str, teacher: Teacher | None) -> None:
    world, rank, k, b = accelerator.num_processes, accelerator.process_index, args.accum, args.batch
    global_batch = world * k * b
    images, labels = make_data(args.steps * global_batch, seed=1)

    set_seed(0)
    model = make_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    schedule = Schedule(optimizer, SchedConfig(name="cosine"), steps_per_epoch=args.steps, epochs=1)
    model, optimizer = accelerator.prepare(model, optimizer)

    allreduces: list[int] = []

    def counting_allreduce(state, bucket):
        allreduces.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    model.register_comm_hook(state=None, hook=counting_allreduce)
    ema = WeightsEma(accelerator.unwrap_model(model), decay=0.8, warmup=True)

    per_micro_step: list[int] = []

    def loader():
        for s in range(args.steps):
            for micro in range(k):
                start = s * global_batch + (rank * k + micro) * b
                before = len(allreduces)
                yield images[start : start + b], labels[start : start + b]
                per_micro_step.append(len(allreduces) - before)

    progress = TrainProgress(accelerator, show_bar=False)
    progress.start_epoch(0, args.steps)
    micro_batches = loader()
    optimizer_steps = 0  # steps on which accelerate synced the gradients, as the loop counts them
    for _ in range(args.steps):
        train_step(model, islice(micro_batches, k), torch.nn.CrossEntropyLoss(), optimizer, accelerator, progress,
                   teacher=teacher)
        optimizer_steps += accelerator.sync_gradients
        schedule.after_optimizer_step()
        ema.update(accelerator.unwrap_model(model))
    assert next(micro_batches, None) is None  # also counts the last micro-step's all-reduces
    (out / f"{prefix}allreduces-rank{rank}.json").write_text(json.dumps({
        "per_micro_step": per_micro_step, "optimizer_steps": optimizer_steps, "world_size": world,
        "distributed_type": accelerator.distributed_type.value, "final_lr": schedule.lr,
    }))
    averaged = {k: v.contiguous() for k, v in ema.state_dict().items() if isinstance(v, torch.Tensor)}
    save_file(averaged, str(out / f"{prefix}ema-rank{rank}.safetensors"))
    if accelerator.is_main_process:
        state = accelerator.unwrap_model(model).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{prefix}ddp.safetensors"))
        if teacher is not None:  # after training: its weights and batch-norm statistics, to compare
            save_file(teacher.model.state_dict(), str(out / "teacher-after.safetensors"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
