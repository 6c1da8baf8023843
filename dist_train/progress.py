"""Training progress: a tqdm bar on the main process, and periodic train records for all ranks.

Losses are accumulated as tensors on the device and read back only when shown or logged,
so the training step never waits on a device-to-host copy.
"""

from __future__ import annotations

import sys
import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

BAR_REFRESH_BATCHES = 10


class TrainProgress:
    def __init__(self, accelerator: Accelerator, epoch: int, first_step: int, total_batches: int,
                 log_every_steps: int, show_bar: bool):
        self.accelerator = accelerator
        self.epoch = epoch
        self.step = first_step  # optimizer steps taken before this epoch
        self.log_every_steps = log_every_steps
        self.records: list[dict] = []  # train records for metrics.jsonl
        self.bar = tqdm(
            total=total_batches,
            desc=f"epoch {epoch}",
            # Only on a terminal: in log files (CI, Slurm) a redrawn bar is noise.
            disable=not (show_bar and accelerator.is_main_process and sys.stderr.isatty()),
            dynamic_ncols=True,
            leave=False,
        )
        self.epoch_loss = torch.zeros((), device=accelerator.device)
        self.epoch_batches = 0
        self.epoch_images = 0
        self.epoch_start = time.perf_counter()
        self._window_loss = torch.zeros((), device=accelerator.device)
        self._window_batches = 0
        self._window_images = 0
        self._window_start = self.epoch_start

    def batch_done(self, loss: torch.Tensor, batch_size: int, lr: float) -> None:
        loss = loss.detach().float()
        self.epoch_loss += loss
        self._window_loss += loss
        self.epoch_batches += 1
        self._window_batches += 1
        self.epoch_images += batch_size
        self._window_images += batch_size
        self.bar.update(1)
        if not self.bar.disable and self.epoch_batches % BAR_REFRESH_BATCHES == 0:
            elapsed = time.perf_counter() - self.epoch_start
            rate = self.epoch_images * self.accelerator.num_processes / max(elapsed, 1e-9)
            self.bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}")

    def step_done(self, lr: float) -> None:
        """Count an optimizer step; every `log_every_steps`, add a train record (all ranks)."""
        self.step += 1
        if self.step % self.log_every_steps != 0:
            return
        step = self.step
        now = time.perf_counter()
        world = self.accelerator.num_processes
        loss = self.accelerator.reduce(self._window_loss / max(self._window_batches, 1), "mean")
        record = {
            "epoch": self.epoch,
            "step": step,
            "train/loss": float(loss),
            "lr": lr,
            "images_per_sec": self._window_images * world / max(now - self._window_start, 1e-9),
        }
        self._window_loss.zero_()
        self._window_batches = self._window_images = 0
        self._window_start = now
        self.records.append(record)

    def drain(self) -> list[dict]:
        """The train records so far, handed over once."""
        records, self.records = self.records, []
        return records

    def close(self) -> dict:
        """Epoch totals across ranks: mean train loss, images per second (call on every rank)."""
        self.bar.close()
        elapsed = time.perf_counter() - self.epoch_start
        loss = self.accelerator.reduce(self.epoch_loss / max(self.epoch_batches, 1), "mean")
        return {
            "train/epoch_loss": float(loss),
            "train/images_per_sec": self.epoch_images * self.accelerator.num_processes / max(elapsed, 1e-9),
            "train/epoch_seconds": elapsed,
        }
