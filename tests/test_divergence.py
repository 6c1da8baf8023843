"""A loss that becomes NaN or infinite stops the run in one line; nothing diverged is saved."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from dist_train.errors import TrainingDiverged
from dist_train.training.progress import TrainProgress


@pytest.fixture
def progress():
    tracked = TrainProgress(Accelerator(cpu=True), show_bar=False)
    tracked.start_epoch(0, steps=10)
    return tracked


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_loss_stops_at_the_next_record_epoch_end_or_checkpoint(progress, bad):
    progress.batch_done(torch.tensor(2.3), 8)
    progress.step_done(0.1)
    assert progress.train_record(0, 1, 0.1)["train/loss"] == pytest.approx(2.3)
    progress.check_finite(1)  # finite so far: a checkpoint may be written
    progress.batch_done(torch.tensor(bad), 8)
    progress.step_done(0.1)
    expected = r"^the training loss became -?(nan|inf) by step 2: the run diverged; lower optim.lr"
    with pytest.raises(TrainingDiverged, match=expected):
        progress.check_finite(2)
    with pytest.raises(TrainingDiverged, match=expected):
        progress.train_record(0, 2, 0.1)
    with pytest.raises(TrainingDiverged, match=r"became -?(nan|inf) in this epoch"):
        progress.end_epoch()
