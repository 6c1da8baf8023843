"""The Accelerator a run trains with, and how DDP wraps the model.

accelerate decides the device, the process group and the mixed precision from the launch
(`launch/*.yaml`, torchrun's environment) and `train.*`; this module only adds what it gets
wrong or leaves slow by default, each with its reason.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from dist_train.accelerate_costs import look_up_optional_packages_once
from dist_train.config import TrainConfig
from dist_train.errors import ConfigError
from dist_train.host_memory import keep_freed_memory

# How DDP wraps the model (only used when there are several processes):
# - broadcast_buffers=False: by default DDP copies rank 0's buffers (BatchNorm statistics) to
#   every rank in each training forward, a collective per step that changes nothing we use.
#   In training mode BatchNorm normalizes with the batch's own statistics; rank 0's running
#   statistics follow its own batches either way; it alone saves checkpoints, and
#   `share_main_buffers` gives every rank its copy before validation. (Measured gain:
#   benchmarks/RESULTS.md, "DDP settings".)
# - gradient_as_bucket_view=True: gradients live in DDP's all-reduce buckets instead of being
#   copied into them and back; one copy of the gradients less in memory.
DDP_SETTINGS = DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    forced_cpu = cfg.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    on_cpu = forced_cpu or not torch.cuda.is_available()
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if on_cpu and precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 is not supported on the CPU (accelerate would silently "
            "train in fp32); use bf16 or no"
        )
    look_up_optional_packages_once()  # accelerate would search sys.path on every optimizer step
    if on_cpu:
        keep_freed_memory()  # a CPU step would otherwise fault its activations back in every time
    # cpu=True matters even without a GPU: it makes a multi-process launch join one gloo
    # process group instead of running as independent single-process jobs.
    return Accelerator(cpu=on_cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                       kwargs_handlers=[DDP_SETTINGS])


def share_main_buffers(model, accelerator: Accelerator) -> None:
    """Copy the main process's buffers (BatchNorm statistics) to every rank before validation.

    DDP is told not to do this in every forward (`DDP_SETTINGS`), so the ranks' running
    statistics drift apart in training; here they become rank 0's, the ones it saves. Every
    rank takes part, also one without a validation batch (fewer samples than processes, or
    all of them damaged), and validation runs the unwrapped model, which has no collective
    inside: a collective in the first validation batch would hang such a rank's peers.
    """
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        torch.distributed.broadcast(buffer, src=0)
