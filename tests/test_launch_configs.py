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


@pytest.mark.parametrize(("variable", "kind"), [("ACCELERATE_USE_FSDP", "FSDP"),
                                                ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_an_accelerate_config_of_another_kind_is_refused_in_one_line(monkeypatch, variable, kind):
    """What `accelerate launch` sets for an FSDP or DeepSpeed config: refused before a model is built."""
    from dist_train.config import TrainConfig
    from dist_train.errors import ConfigError
    from dist_train.runtime.accelerator import make_accelerator

    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match=rf"^an accelerate config of type {kind} \({variable} is set\): dist-train "
                                          r"trains with DDP; launch with one of launch/\*\.yaml"):
        make_accelerator(TrainConfig(cpu=True))
