"""`dist-train bench --quick` runs every figure end to end (values are reported, not asserted:
timings belong in benchmarks/RESULTS.md, not in tests that flake)."""

from __future__ import annotations

import json
import math

import pytest

from dist_train.bench import TARGETS

from .conftest import run_cli

pytestmark = pytest.mark.slow


def test_bench_quick_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--quick", "--json", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(out.read_text())
    for name in TARGETS:
        assert math.isfinite(figures[name]) and figures[name] > 0, name
        assert name in result.stdout
    assert figures["best_workers"] in (0, 2)
    # The loaders are timed started; what starting one costs is printed beside them.
    assert math.isfinite(figures["loader_first_batch_ms"]) and figures["loader_first_batch_ms"] > 0
    assert "first batch comes after" in result.stdout
    # ddp_scaling's ceiling: the same 2 processes without DDP, measured in the same launches.
    assert math.isfinite(figures["ddp_ceiling"]) and figures["ddp_ceiling"] > 0
    assert "2 processes that do not communicate reach" in result.stdout
    assert {"torch", "accelerate", "cores", "date"} <= set(figures["machine"])
    assert figures["compile_seconds"] > 0 and "the compile took" in result.stdout
