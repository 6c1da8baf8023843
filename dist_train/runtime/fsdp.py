"""FSDP2: the model's parameters, gradients and optimizer state sharded over the processes.

`train.parallel=fsdp` shards each repeated block of the model (runtime/blocks.py), then the
root, with torch's `fully_shard`: a block's full weights exist only while it computes, and
its gradients are reduce-scattered into shards. `hsdp` shards within groups of processes (a
node's) and replicates across them. `train.mixed_precision=bf16` becomes FSDP's policy: bf16
parameters and compute, gradients reduced in fp32, the output in fp32 for the loss.

Why `fully_shard` itself and not accelerate's FSDP plugin: the plugin's auto-wrap policies
name transformer classes (timm's models declare none), and its checkpoints go through torch's
distributed checkpoint, whose metadata is a pickle. Here the blocks are found for any model,
and checkpoints stay the project's own: the full tensors, gathered (`full_state_dict`), in the
same safetensors files as under DDP, so a checkpoint resumes under either, on any process count.

The loop does not change. accelerate's `accumulate` calls the model's `no_sync()` on the
micro-steps that must not reduce; the sharded model gets one (`_gradient_sync_off`) that turns
the reduce-scatter off: one reduction per optimizer step, as DDP's one all-reduce.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from dist_train.config import TrainConfig
from dist_train.errors import ConfigError
from dist_train.runtime.blocks import repeated_blocks

SHARDED_MODES = ("fsdp", "hsdp")


def shard_for_training(model: nn.Module, cfg: TrainConfig, device: torch.device, world_size: int,
                       mixed_precision: str) -> tuple[nn.Module | None, str]:
    """Shard `model` in place as `train.parallel` asks, over several processes (one process
    trains unsharded): (an unsharded copy of it for validation, how it is sharded in words),
    or (None, "") when it is not."""
    if cfg.parallel not in SHARDED_MODES or world_size == 1:
        return None, ""
    replica = copy.deepcopy(model.to(device))
    # torchrun sets LOCAL_WORLD_SIZE on each node (and so does accelerate launch).
    shard_size = cfg.hsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return replica, shard_model(model, cfg.parallel, device, world_size, shard_size, mixed_precision)


def shard_model(model: nn.Module, parallel: str, device: torch.device, world_size: int, shard_size: int,
                mixed_precision: str) -> str:
    """Shard `model` in place over the processes (`parallel`: fsdp or hsdp, with `shard_size`
    processes a shard group); returns how, in words, for the run's first line."""
    if mixed_precision == "fp16":  # set by an accelerate launch config, not train.mixed_precision
        raise ConfigError(f"mixed precision fp16 under train.parallel={parallel}: FSDP's mixed precision here "
                          "is bf16 (no sharded loss scaling); use bf16 or no")
    mesh = _mesh(parallel, device, world_size, shard_size)
    block_policy = root_policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The root's output in fp32 for the loss; the blocks' stay bf16 for the next block and
        # the root's own layers (a final norm) to take.
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                           output_dtype=torch.float32)
        # BatchNorm in fp32, as autocast runs it under DDP: its statistics are fp32 buffers,
        # which FSDP does not cast (a bf16 BatchNorm is refused by the CPU's kernel). Its own
        # unit casts its input to fp32 and its output back to bf16 for the layers after it.
        fp32_norm = MixedPrecisionPolicy(param_dtype=torch.float32, output_dtype=torch.bfloat16)
        for norm in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            fully_shard(norm, mesh=mesh, mp_policy=fp32_norm)
    blocks = repeated_blocks(model)
    for block in blocks:
        if not isinstance(block, FSDPModule):  # a block that is itself a BatchNorm has its unit
            fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    model.no_sync = partial(_gradient_sync_off, model)  # what accelerate's accumulate calls
    units = f"{len(blocks)} blocks and the root" if blocks else "the whole model as one unit"
    if parallel == "hsdp":
        replicas, shards = mesh.shape
        return f"HSDP: {units} sharded over {shards} processes, {replicas} replica(s)"
    return f"FSDP: {units} sharded over {world_size} processes"


def _mesh(parallel: str, device: torch.device, world_size: int, shard_size: int) -> DeviceMesh:
    if parallel == "fsdp":
        return init_device_mesh(device.type, (world_size,))
    if shard_size < 1 or world_size % shard_size:
        raise ConfigError(f"train.parallel=hsdp: shard groups of {shard_size} processes do not divide the "
                          f"{world_size} processes (train.hsdp_shard_size; 0: a node's processes)")
    return init_device_mesh(device.type, (world_size // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


@contextmanager
def _gradient_sync_off(model: FSDPModule) -> Iterator[None]:
    """Gradients accumulate unsharded, with no reduce-scatter, until the context ends."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def gathered(value: Any) -> Any:
    """A sharded tensor's full value (a collective: every rank gathers the same tensors in the
    same order), in host memory; anything else as it is."""
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every tensor whole, on every rank (a collective)."""
    return {name: gathered(value) for name, value in model.state_dict().items()}


def sharded_like(value: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """`value`, a full tensor every rank holds, as the shard of it that `like` (a sharded
    parameter or its optimizer state) keeps here; no communication. Unsharded: as it is."""
    if isinstance(like, DTensor) and value.shape == like.shape:
        return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
    return value


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (a checkpoint's) into a model: a sharded one keeps this rank's shards."""
    own = model.state_dict()
    model.load_state_dict({name: sharded_like(value, own.get(name)) for name, value in state.items()})
