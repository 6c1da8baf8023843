"""Graceful stop on SIGTERM and SIGUSR1 (preemption, time limits, `scancel --signal`).

The handler only sets a flag: saving inside a signal handler can deadlock or corrupt a
checkpoint. The loop asks `requested()` after every optimizer step; the answer is agreed by
all ranks (a sum over a one-element all-reduce), so every rank stops after the same step,
saves a resumable checkpoint and exits with EXIT_PREEMPTED. Resume with `train.resume=auto`.
"""

from __future__ import annotations

import signal

import torch
from accelerate import Accelerator

# EX_TEMPFAIL from sysexits.h: "try again later". Job schedulers requeue on it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(Exception):
    """Raised by `fit` after the checkpoint that a stop signal asked for has been saved."""


class StopRequest:
    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: int | None = None
        self._flag = torch.zeros(1, device=accelerator.device)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """True on every rank once any rank has received a stop signal (collective)."""
        if self.accelerator.num_processes == 1:
            return self.received is not None
        self._flag.fill_(1.0 if self.received is not None else 0.0)
        return self.accelerator.reduce(self._flag.clone(), "sum").item() > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
