"""`dist-train bench`'s figures and their targets (benchmarks/bench.py's docstring says what
each measures), and `--only`'s choice of them: no torch here, as `dist-train bench` reads them
before its process imports torch (bench_versus.py says why)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    op: str  # ">=", "<=", "<"
    value: float

    def met(self, x: float) -> bool:
        return {">=": x >= self.value, "<=": x <= self.value, "<": x < self.value}[self.op]


TARGETS = {
    "loop_overhead": Target(">=", 0.97),
    "loader_vs_decode": Target(">=", 0.9),
    "loader_vs_imagefolder": Target(">=", 1.0),
    "ddp_scaling": Target(">=", 1.7),
    "no_sync_gain": Target("<", 1.0),
    "time_to_acc": Target("<=", 60.0),
    "time_to_acc_shipped": Target("<=", 30.0),
    "peak_rss_mb": Target("<=", 1500.0),
    # A ratio, not seconds over: seconds grow with the machine (benchmarks/RESULTS.md, 2026-12-07).
    "startup_vs_plain": Target("<=", 1.4),
    "ddp_startup_vs_plain": Target("<=", 1.4),
    "tree_pss_vs_plain": Target("<=", 1.2),
    "throughput_vs_plain": Target(">=", 1.1),
    "index_build_s": Target("<=", 5.0),
    "index_worker_mb": Target("<=", 50.0),
    "compile_speedup": Target(">=", 1.0),
    "progressive_speedup": Target(">=", 1.15),
    "fsdp_state_vs_ddp": Target("<=", 0.55),
    "activation_memory_ratio": Target("<=", 0.5),
    "whole_run_vs_timm": Target("<=", 0.9),
    "remote_vs_local": Target(">=", 0.95),
    "remote_rate_limited": Target(">=", 0.9),
}


VERSUS_FIGURES = ("startup_vs_plain", "ddp_startup_vs_plain", "tree_pss_vs_plain", "throughput_vs_plain")


def figures_wanted(only: str | None) -> set[str]:
    """`--only a,b`: those figures (names of TARGETS); None: every one."""
    if not only:
        return set(TARGETS)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    if unknown := sorted(wanted - set(TARGETS)):
        raise ValueError(f"--only: unknown figure(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    return wanted
