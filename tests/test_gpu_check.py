"""The prepared GPU check runs anywhere: here on the CPU with a tiny step count, decoding the
JPEGs in the training process as a GPU would (--decode-on-device; without it, the pipeline is
the one every other test runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("extra", [
    ["--decode-on-device"],
    ["--parallel", "fsdp", "--precision", "bf16", "--image-size", "64"],  # ResNet-50: its BatchNorm kept in fp32
])
def test_gpu_check_smoke_on_cpu(tmp_path, extra):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--steps", "2", "--warmup", "1",
         "--batch-size", "2", "--image-size", "32", "--workers", "0", "--precision", "no", *extra,
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu"
    if "--parallel" in extra:  # the FSDP code path in bf16, sharded over a group of one process
        assert figures["sharding"].startswith("FSDP: 4 blocks and the root")
    else:
        assert figures["model"] == "resnet50" and figures["decode_on_device"]
    assert figures["pipeline_images_per_sec"] > 0 and figures["model_images_per_sec"] > 0
    assert "pipeline_images_per_sec" in result.stdout
