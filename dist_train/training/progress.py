"""Training progress: a tqdm bar per epoch on the main process, and the train statistics that
metrics.jsonl records (mean loss and images/s per logging window and per epoch). Where there
is no terminal (a Slurm log, `nohup`, CI), a line per train record instead of the bar:

    epoch 0, step 10 of 44: loss 1.5123 | lr 0.0227 | 1234 img/s

Losses are accumulated as tensors on the device and read back only when shown or logged,
so the training step never waits on a device-to-host copy. A loss read back as NaN or
infinite stops the run (`TrainingDiverged`, exit 2): it is read at every train record, every
epoch end and before every resumable checkpoint, so no checkpoint holds a diverged model and
no run trains on NaN to its end.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from dist_train.errors import TrainingDiverged

BAR_REFRESH_STEPS = 10


class _Totals:
    """Loss, batches and images since `start`, and the time it started."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.start(time.perf_counter())

    def start(self, now: float) -> None:
        self.loss.zero_()
        self.batches = self.images = 0
        self.started = now

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss += loss
        self.batches += 1
        self.images += images


class TrainProgress:
    def __init__(self, accelerator: Accelerator, show_bar: bool):
        self.accelerator = accelerator
        # Only on a terminal: in log files (CI, Slurm) a redrawn bar is noise; a line per train
        # record says the same there.
        self.show_bar = show_bar and accelerator.is_main_process and sys.stderr.isatty()
        self.show_lines = show_bar and accelerator.is_main_process and not self.show_bar
        self.step_in_epoch = self.steps_per_epoch = 0  # for the lines
        self.bar: tqdm | None = None
        self.epoch = _Totals(accelerator.device)
        self.window = _Totals(accelerator.device)  # since the last train record

    def start_epoch(self, epoch: int, steps: int, steps_per_epoch: int | None = None) -> None:
        """An epoch (or the rest of one, after a resume) of `steps` optimizer steps begins."""
        # No bar at all where none shows: a disabled tqdm bar still starts tqdm's monitor thread
        # and keeps it (runtime/progress_lines.py).
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False) if self.show_bar else None
        self.steps_per_epoch = steps_per_epoch or steps
        self.step_in_epoch = self.steps_per_epoch - steps
        now = time.perf_counter()
        self.epoch.start(now)
        self.window.start(now)

    def batch_done(self, loss: torch.Tensor, batch_size: int) -> None:
        loss = loss.detach().float()
        self.epoch.add(loss, batch_size)
        self.window.add(loss, batch_size)

    def step_done(self, lr: float) -> None:
        self.step_in_epoch += 1
        if self.bar is None:
            return
        self.bar.update(1)
        if self.bar.n % BAR_REFRESH_STEPS == 0:
            rate = self._rate(self.epoch, time.perf_counter())
            loss = self.epoch.loss.item() / max(self.epoch.batches, 1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")

    def train_record(self, epoch: int, step: int, lr: float) -> dict:
        """The train record of the steps since the last one (collective: call on every rank)."""
        now = time.perf_counter()
        loss = _finite(self.accelerator.reduce(self.window.loss / max(self.window.batches, 1), "mean"),
                       f"by step {step}")
        record = {"epoch": epoch, "step": step, "train/loss": loss, "lr": lr,
                  "images_per_sec": self._rate(self.window, now)}
        self.window.start(now)
        if self.show_lines:
            print(f"epoch {epoch}, step {self.step_in_epoch} of {self.steps_per_epoch}: loss {loss:.4f} | "
                  f"lr {lr:.3g} | {record['images_per_sec']:.0f} img/s", flush=True)
        return record

    def end_epoch(self) -> dict:
        """Epoch totals across ranks: mean train loss, images per second (collective)."""
        if self.bar is not None:
            self.bar.close()
        now = time.perf_counter()
        loss = _finite(self.accelerator.reduce(self.epoch.loss / max(self.epoch.batches, 1), "mean"),
                       "in this epoch")
        return {
            "train/epoch_loss": loss,
            "train/images_per_sec": self._rate(self.epoch, now),
            "train/epoch_seconds": now - self.epoch.started,
        }

    def check_finite(self, step: int) -> None:
        """Raise TrainingDiverged if any loss of this epoch so far was not finite (collective)."""
        _finite(self.accelerator.reduce(self.epoch.loss.clone(), "sum"), f"by step {step}")

    def _rate(self, totals: _Totals, now: float) -> float:
        """Images per second over all ranks (each trains as many as this one)."""
        return totals.images * self.accelerator.num_processes / max(now - totals.started, 1e-9)


def _finite(loss: torch.Tensor, when: str) -> float:
    value = float(loss)
    if not math.isfinite(value):
        raise TrainingDiverged(f"the training loss became {value} {when}: the run diverged; lower optim.lr or "
                               "set train.clip_grad_norm (best/ and the checkpoints saved before are kept)")
    return value


def epoch_line(record: dict) -> str:
    """The line printed after each validation (at an epoch's end, or mid-epoch at a step)."""
    values = {k: v for k, v in record.items() if k.startswith("val/") and isinstance(v, float)}
    skipped = record.get("data/skipped_samples")
    train = "train/epoch_loss" in record
    return ((f"epoch {record['epoch']}: train loss {record['train/epoch_loss']:.4f} | val " if train
             else f"epoch {record['epoch']}, step {record['step']}: val ")
            + "  ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in values.items())
            + (f" | {record['train/images_per_sec']:.0f} img/s" if train else "")
            + (f" at {record['train/image_size']} px" if "train/image_size" in record else "")
            + (f" | skipped {skipped} damaged samples" if skipped is not None else ""))
