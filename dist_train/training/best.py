"""Which validations count: the best so far (RUN/best), the `train.keep_best` best (RUN/top/),
and early stopping (`train.early_stop_patience`), decided in one place from the monitor's
values. The run writes and removes the checkpoints these decisions name (training/run.py);
the state is part of every resumable checkpoint, so a resumed run decides as the first would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


def is_better(value: float, best: float | None, mode: str) -> bool:
    """`value` improves on `best` by `train.monitor_mode` (a NaN never does; ties do not)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


@dataclass(frozen=True)
class Verdict:
    """What one validation earns: the new best (RUN/best), a place among the top (RUN/top/),
    and the steps whose top checkpoints stay (every other one goes)."""

    best: bool
    in_top: bool
    top_steps: frozenset[int]


@dataclass
class BestSoFar:
    """The best validation so far by `train.monitor`, the validations since (early stopping),
    and the `train.keep_best` best ones."""

    value: float | None = None
    epoch: int = -1
    metrics: dict[str, float] | None = None
    step: int = -1
    since: int = 0  # validations without an improvement since the best
    top: list[list[float | int]] = field(default_factory=list)  # [value, step] of RUN/top/, best first

    def judge(self, value: float, epoch: int, metrics: dict[str, float], step: int, mode: str,
              keep_best: int) -> Verdict:
        """Record the validation at `step` whose monitor is `value`, and say what it earned."""
        best = is_better(value, self.value, mode)
        if best:
            self.value, self.epoch, self.metrics, self.step, self.since = value, epoch, metrics, step, 0
        else:
            self.since += 1
        in_top = False
        if keep_best >= 2:  # a stable sort: ties keep the earlier
            ranked = sorted([*self.top, [value, step]], key=lambda e: e[0], reverse=mode == "max")
            self.top = ranked[:keep_best]
            in_top = [value, step] in self.top
        return Verdict(best, in_top, frozenset(int(s) for _, s in self.top))

    def stopped_improving(self, patience: int | None) -> bool:
        """True once `patience` validations in a row have not improved the monitor."""
        return patience is not None and self.since >= patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.epoch, self.metrics = state["value"], state["epoch"], state["metrics"]
        # Checkpoints written before early stopping and train.keep_best existed lack these.
        self.step, self.since, self.top = state.get("step", -1), state.get("since", 0), state.get("top", [])

