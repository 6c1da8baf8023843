"""`dist-train bench --quick` runs every figure end to end (values are reported, not asserted:
timings belong in benchmarks/RESULTS.md, not in tests that flake)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from benchmarks.bench import TARGETS
from benchmarks.bench_versus import tree_pss_kb

from .conftest import run_cli

pytestmark = pytest.mark.slow
NEEDS_NGINX = ("remote_vs_local", "remote_rate_limited")  # streamed from a local nginx (.ci/run installs it)


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One `dist-train bench --quick` run, its output and its JSON figures."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = run_cli("bench", "--quick", "--json", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result, json.loads(out.read_text())


def test_bench_quick_reports_every_figure(quick_bench):
    result, figures = quick_bench
    for name in TARGETS:
        if name in NEEDS_NGINX:
            continue  # test_bench_quick_reports_the_remote_figures
        assert math.isfinite(figures[name]) and figures[name] > 0, name
        assert name in result.stdout
    # Each figure against the plain webdataset loop, with both sides printed beside it.
    for side in ("startup_s", "tree_pss_mb", "images_per_sec"):
        assert figures[side] > 0 and figures[f"plain_{side}"] > 0, side
    assert "the plain loop's" in result.stdout
    # The GPU figure (benchmarks/gpu_check.py twice) where there is one; said pending here.
    assert figures["gpu"] == "pending (no GPU here)" and "model alone: pending" in result.stdout
    assert figures["best_workers"] in (0, 2)
    # The loaders are timed started; what starting one costs is printed beside them.
    assert math.isfinite(figures["loader_first_batch_ms"]) and figures["loader_first_batch_ms"] > 0
    assert "first batch comes after" in result.stdout
    # ddp_scaling's ceiling: the same 2 processes without DDP, measured in the same launches.
    assert math.isfinite(figures["ddp_ceiling"]) and figures["ddp_ceiling"] > 0
    assert "2 processes that do not communicate reach" in result.stdout
    assert math.isfinite(figures["ddp_vs_normal"]) and "threads on every core is" in result.stdout
    assert {"torch", "accelerate", "cores", "date"} <= set(figures["machine"])
    assert figures["compile_seconds"] > 0 and "the compile took" in result.stdout
    # Sharding halves what each of 2 processes holds of every part; checkpointing, activations.
    fsdp, ddp = figures["fsdp_bytes"]["fsdp"], figures["fsdp_bytes"]["ddp"]
    assert all(0 < fsdp[part] < ddp[part] for part in ("params", "grads", "optimizer_state"))
    assert "MiB under FSDP" in result.stdout and "MiB with checkpointing" in result.stdout


def test_bench_quick_reports_the_remote_figures(quick_bench):
    result, figures = quick_bench
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) and not os.environ.get("CI"):
        # The bench says so itself: the figures are nan, the reason beside them.
        assert all(math.isnan(figures[name]) for name in NEEDS_NGINX)
        assert "skipped: nginx is not installed" in result.stdout
        pytest.skip("needs Debian's nginx (apt-get install nginx-light; .ci/run installs it)")
    for name in NEEDS_NGINX:
        assert math.isfinite(figures[name]) and figures[name] > 0, name
        assert name in result.stdout


# A parent holding 200 MB and a forked child sharing them, both waiting.
SHARING_TREE = """
import os, sys, time
block = bytearray(200 << 20)
block[::4096] = b"x" * len(block[::4096])  # touched: resident
if os.fork() == 0:
    time.sleep(600)
print("ready", flush=True)
time.sleep(600)
"""


def test_tree_pss_counts_a_page_shared_by_a_parent_and_its_child_once():
    process = subprocess.Popen([sys.executable, "-c", SHARING_TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        rss_mb = sum(p.memory_info().rss for p in tree) / 2**20
        pss_mb = tree_pss_kb(process.pid) / 1024
        assert len(tree) == 2 and rss_mb > 400  # RSS counts the shared 200 MB in each process
        assert 200 < pss_mb < 260, pss_mb  # PSS counts them once (plus two small interpreters)
    finally:
        for p in psutil.Process(process.pid).children(recursive=True):
            p.kill()
        process.kill()
        process.wait()


def test_bench_only_measures_the_figures_named(tmp_path):
    """`--only`: a bisect times one figure, not the whole bench; a name mistyped is one line."""
    result = run_cli("bench", "--only", "loop_overhead,ddp_scalin")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown figure(s) ddp_scalin; choose from loop_overhead" in result.stderr.strip().splitlines()[-1]
    out = tmp_path / "only.json"
    result = run_cli("bench", "--quick", "--only", "loop_overhead", "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures) & set(TARGETS) == {"loop_overhead"} and math.isfinite(figures["loop_overhead"])
    assert "loop_overhead" in result.stdout and "ddp_scaling" not in result.stdout
