"""The accelerate configs in launch/ load with accelerate's own loader and say what they claim."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from .conftest import REPO

LAUNCH = REPO / "launch"


@pytest.mark.parametrize(
    ("name", "distributed", "processes", "cpu", "precision"),
    [
        ("cpu.yaml", DistributedType.NO, 1, True, "no"),
        # The torchrun-style launcher with use_cpu: one gloo group (MULTI_CPU) at run time.
        ("cpu-ddp.yaml", DistributedType.MULTI_GPU, 2, True, "no"),
        ("gpu.yaml", DistributedType.NO, 1, False, "no"),
        ("gpus-bf16.yaml", DistributedType.MULTI_GPU, 8, False, "bf16"),
        ("multi-node.yaml", DistributedType.MULTI_GPU, 16, False, "bf16"),
    ],
)
def test_launch_config(name, distributed, processes, cpu, precision):
    config = load_config_from_file(str(LAUNCH / name))
    assert config.distributed_type == distributed
    assert config.num_processes == processes
    assert config.use_cpu is cpu
    assert str(config.mixed_precision) == precision


def test_every_launch_config_is_covered():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == [
        "cpu-ddp.yaml", "cpu.yaml", "gpu.yaml", "gpus-bf16.yaml", "multi-node.yaml",
    ]
