"""Where start-up time goes: a clock of named phases, from the process's start to the first
optimizer step, printed by `dist-train train --profile-startup` (by the main process).

    start-up 2.59 s to the first optimizer step: python and config 0.33 s | helpers 0.00 s |
    datasets 0.07 s | imports 1.92 s | fork server 0.01 s | accelerator 0.00 s | ...

Each phase is the time since the previous mark; the first counts from the process's creation
(as the kernel records it), so the interpreter's own start-up is in it. Marks cost a clock
read: they are always taken, printed only when asked for.

The creation time comes from the kernel's clock of time since boot (/proc/uptime and the
process's start in /proc/self/stat, both since boot): psutil's `create_time()` adds them to the
boot time, which Linux gives in whole seconds, so its figure is up to a second early (0.93 s on
the machine the bench runs on: the first phase read 0.98 s for 0.05 s of work).
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


def process_started() -> float:
    """When this process was created, as a `time.time()` reading."""
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        with open("/proc/self/stat") as f:  # field 22, after the parenthesised command name
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux
        return psutil.Process(os.getpid()).create_time()


def phases() -> list[tuple[str, float]]:
    """(phase, seconds) in order; the first from the process's creation."""
    previous = process_started()
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
