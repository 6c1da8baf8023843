"""How far a long command has got (make-shards, eval, predict): a tqdm bar on a terminal;
in a log (a Slurm job, `nohup`, CI) a line every EVERY_S seconds instead, on stderr, so that
`eval --json`'s stdout stays the JSON alone:

    predict: 12,800 of 50,000 images (25%), 1,280 images/s

A command shorter than EVERY_S prints no line at all (a test's, a small folder's).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

EVERY_S = 10.0


class Progress:
    def __init__(self, what: str, total: int, unit: str = "images", enabled: bool = True):
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.started = self.last_line = time.monotonic()
        terminal = enabled and sys.stderr.isatty()
        self.lines = enabled and not terminal
        # No tqdm at all off a terminal: even a disabled bar starts tqdm's monitor thread, and
        # keeps it until the bar is collected (a disabled bar's close() does not count it out).
        # A thread in the training process would make `dist-train train` exec its workers' fork
        # server instead of forking it (data/workers.py).
        self.bar = tqdm(total=total, desc=what, unit=f" {unit}", leave=False, dynamic_ncols=True) if terminal else None

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        now = time.monotonic()
        if self.lines and now - self.last_line >= EVERY_S:
            self.last_line = now
            share = f" ({100 * self.done // self.total}%)" if self.total else ""
            rate = self.done / max(now - self.started, 1e-9)
            print(f"{self.what}: {self.done:,} of {self.total:,} {self.unit}{share}, {rate:,.0f} {self.unit}/s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
