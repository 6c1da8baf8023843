"""Per-step costs of accelerate that do not need to be paid every step.

accelerate 1.15's `AcceleratedOptimizer.step` asks, twice on every call (every micro-batch),
whether the `lomo_optim` package is installed, and the answer is not cached: each call is an
`importlib.util.find_spec`, a search of every `sys.path` entry on disk: on a local disk,
half of the framework's own time per step of a tiny model (benchmarks/RESULTS.md); it grows
with the length of `sys.path` and the latency of the filesystem (a virtualenv on a network file
system). Whether a package is installed does not change while a run trains, so the answer is
looked up once.
"""

from __future__ import annotations

import functools

import accelerate.optimizer


def look_up_optional_packages_once() -> None:
    """Cache accelerate's per-step package lookup (idempotent; a no-op where a version of
    accelerate has no such lookup)."""
    lookup = getattr(accelerate.optimizer, "is_lomo_available", None)
    if lookup is not None and not hasattr(lookup, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(lookup)
