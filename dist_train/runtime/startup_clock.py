"""Where start-up time goes: a clock of named phases, from the process's start to the first
optimizer step, printed by `dist-train train --profile-startup` (by the main process).

    start-up 2.59 s to the first optimizer step: python and config 0.33 s | helpers 0.00 s |
    datasets 0.07 s | imports 1.92 s | fork server 0.01 s | accelerator 0.00 s | ...

Each phase is the time since the previous mark; the first counts from the process's creation
(as the kernel records it), so the interpreter's own start-up is in it. Marks cost a clock
read: they are always taken, printed only when asked for.
"""

from __future__ import annotations

import os
import time

import psutil

_marks: list[tuple[str, float]] = []
_enabled = False


def enable() -> None:
    global _enabled
    _enabled = True


def mark(phase: str) -> None:
    """The phase that ends now (named by what it did)."""
    _marks.append((phase, time.time()))


def phases() -> list[tuple[str, float]]:
    """(phase, seconds) in order; the first from the process's creation."""
    previous = psutil.Process(os.getpid()).create_time()
    found = []
    for phase, at in _marks:
        found.append((phase, at - previous))
        previous = at
    return found


def report(print_line) -> None:
    """Print the phases in one line (through `print_line`, e.g. accelerator.print) if enabled."""
    if _enabled and _marks:
        timed = phases()
        total = sum(seconds for _, seconds in timed)
        print_line(f"start-up {total:.2f} s to the first optimizer step: "
                   + " | ".join(f"{phase} {seconds:.2f} s" for phase, seconds in timed))
