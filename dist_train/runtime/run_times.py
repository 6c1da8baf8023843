"""Where a run's time went, in one line the main process prints at its end:

    time 65.02 s: to the first step 3.21 s | training 54.81 s | validation 5.31 s | checkpoints 2.04 s |
    models 0.84 s | report 0.65 s | trackers 0.00 s

Each phase is the sum of the spans timed under its name (`with times("validation"): ...`); the
training is what is left of the run after its first step: the steps, the data they waited for,
the progress. Phases are timed where their work is done and never inside one another, so they
add up to the run (from `start_run` to the end). Start-up's own phases: runtime/startup_clock.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class RunTimes:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_step: float | None = None  # seconds from the start to the first step's end
        self.phases: dict[str, float] = {}

    def first_step_done(self) -> None:
        self.first_step = time.perf_counter() - self.started

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - began

    def line(self) -> str:
        total = time.perf_counter() - self.started
        first = self.first_step or 0.0
        parts = {"to the first step": first, "training": total - first - sum(self.phases.values()), **self.phases}
        return f"time {total:.2f} s: " + " | ".join(f"{name} {seconds:.2f} s" for name, seconds in parts.items())
