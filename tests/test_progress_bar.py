"""The epoch's progress bar: tqdm on a terminal; nowhere else a tqdm object at all (a disabled
bar still starts tqdm's monitor thread, and keeps it)."""

from __future__ import annotations

import sys

import pytest
import torch
from accelerate import Accelerator

from dist_train.training import progress as progress_module
from dist_train.training.progress import TrainProgress


def an_epoch(tracked: TrainProgress, steps: int = 3) -> dict:
    tracked.start_epoch(0, steps=steps)
    for _ in range(steps):
        tracked.batch_done(torch.tensor(1.5), 8)
        tracked.step_done(0.1)
    return tracked.end_epoch()


def test_off_a_terminal_no_tqdm_bar_is_made(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(progress_module, "tqdm", lambda *args, **kwargs: pytest.fail("a tqdm bar off a terminal"))
    assert an_epoch(TrainProgress(Accelerator(cpu=True), show_bar=True))["train/epoch_loss"] == pytest.approx(1.5)


def test_on_a_terminal_the_bar_counts_the_steps(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    made = []

    class Bar(progress_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(progress_module, "tqdm", Bar)
    assert an_epoch(TrainProgress(Accelerator(cpu=True), show_bar=True))["train/epoch_loss"] == pytest.approx(1.5)
    (bar,) = made
    assert bar.n == 3 and bar.total == 3
