"""The Accelerator a run trains with, and how DDP wraps the model.

accelerate decides the device, the process group and the mixed precision from the launch
(`launch/*.yaml`, torchrun's environment) and `train.*`; this module only adds what it gets
wrong or leaves slow by default, each with its reason.
"""

from __future__ import annotations

import os
import shutil

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin
from torch import nn

from dist_train.config import TrainConfig
from dist_train.errors import ConfigError
from dist_train.runtime.accelerate_patches import look_up_optional_packages_once
from dist_train.runtime.host_memory import keep_freed_memory

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


# What `accelerate launch` sets for a config of another kind than single / MULTI_CPU / MULTI_GPU:
# its wrapping of the model would bypass what dist-train guarantees (one all-reduce per step,
# checkpoints of the whole model in safetensors, exact resume).
UNSUPPORTED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                        "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    for variable, kind in UNSUPPORTED_LAUNCHES.items():
        if os.environ.get(variable, "").lower() in ("1", "true"):
            raise ConfigError(f"an accelerate config of type {kind} ({variable} is set): dist-train trains with "
                              "DDP; launch with one of launch/*.yaml (cpu, cpu-ddp, gpu, gpus-bf16, multi-node)")
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
    if cfg.compile and (problem := _cannot_compile(on_cpu)):
        raise ConfigError(f"train.compile=true: {problem}; set train.compile=false")
    # accelerate compiles the model last in prepare(), after the DDP wrap: compiling before it
    # stalls (timm 2693, pytorch 108966).
    dynamo = TorchDynamoPlugin(backend="inductor", mode=cfg.compile_mode) if cfg.compile else None
    # A run before this one in the same process (a notebook's second `fit`) left accelerate's
    # state set: its mixed precision would be refused as a change. The process group
    # (PartialState) stays: it is the launch's, not the run's.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(cpu=on_cpu, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                       kwargs_handlers=[DDP_SETTINGS], dynamo_plugin=dynamo)


def _cannot_compile(on_cpu: bool) -> str | None:
    """Why torch.compile would fail here, found before the first step rather than inside it."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    if on_cpu and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "inductor needs a C++ compiler for CPU kernels (g++ or clang++ on PATH, or CXX)"
    if not on_cpu:
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton for GPU kernels (pip install triton)"
    return None


def bare_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model without its DDP and torch.compile wrappers: what is saved, loaded, validated
    and averaged, under its own parameter names (torch.compile's would add `_orig_mod.`)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


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
    for buffer in bare_model(accelerator, model).buffers():
        torch.distributed.broadcast(buffer, src=0)
