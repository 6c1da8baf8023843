"""The prepared GPU check runs anywhere: here on the CPU with a tiny step count."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--steps", "2", "--warmup", "1",
         "--batch-size", "2", "--image-size", "32", "--workers", "0", "--precision", "no", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["model"] == "resnet50" and figures["device"] == "cpu"
    assert figures["pipeline_images_per_sec"] > 0 and figures["model_images_per_sec"] > 0
    assert "pipeline_images_per_sec" in result.stdout
