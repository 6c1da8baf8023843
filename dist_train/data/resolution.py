"""The training resolution over a run: progressive resizing.

The fastest published ImageNet schedules train at a low resolution first (FFCV's ResNet-50:
160 px, ramped to 192 px over the last epochs, evaluated at 256 px; Composer's
ProgressiveResizing; timm's --train-size-schedule). Here the size of the training crop is a
pure function of the optimizer step: linear in the epoch (fractional, so the switch may come
mid-epoch) from `data.progressive_start_size` at `data.progressive_start_epoch` to
`data.image_size` at `data.progressive_end_epoch`, rounded to a multiple of
`data.progressive_step` (FFCV's `int(np.round(res / 32)) * 32`). Every process and every
micro-batch of a step crops at the same size, so W x K x b equivalence and bitwise resume
hold; the batch size does not change; evaluation keeps its own size (data.val_crop_size).
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_train.config import DataConfig


@dataclass(frozen=True)
class ResolutionSchedule:
    start: int  # pixels a side up to start_epoch
    end: int  # from end_epoch on: data.image_size
    start_epoch: float
    end_epoch: float
    step: int  # sizes in between are multiples of this

    def size_at(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> int:
        """The crop size of the optimizer step `step_in_epoch` (from 0) of `epoch`."""
        t = epoch + step_in_epoch / steps_per_epoch
        if t <= self.start_epoch:
            return self.start
        if t >= self.end_epoch:
            return self.end
        size = self.start + (self.end - self.start) * (t - self.start_epoch) / (self.end_epoch - self.start_epoch)
        # Rounded to the step, but never past either end (an end that is no multiple of it).
        return min(max(round(size / self.step) * self.step, min(self.start, self.end)), max(self.start, self.end))

    def size_of_step(self, step: int, steps_per_epoch: int) -> int:
        """The crop size of global optimizer step `step` (from 0)."""
        return self.size_at(*divmod(step, steps_per_epoch), steps_per_epoch)

    def steps_per_size(self, steps_per_epoch: int, epochs: int) -> dict[int, int]:
        """How many optimizer steps of the run train at each size, the sizes in the run's order."""
        counts: dict[int, int] = {}
        for step in range(steps_per_epoch * epochs):
            size = self.size_of_step(step, steps_per_epoch)
            counts[size] = counts.get(size, 0) + 1
        return counts

    def first_step_at(self, size: int, steps_per_epoch: int, epochs: int) -> int | None:
        """The first global optimizer step (from 0) trained at `size`, None if none is."""
        return next((step for step in range(steps_per_epoch * epochs)
                     if self.size_of_step(step, steps_per_epoch) == size), None)

    def sizes(self, steps_per_epoch: int, epochs: int) -> list[int]:
        """Every size the run trains at, in order (the schedule only grows)."""
        return list(self.steps_per_size(steps_per_epoch, epochs))


def resolution_schedule(cfg: DataConfig, epochs: int) -> ResolutionSchedule | None:
    """The run's schedule; None with data.progressive_start_size=0 (one size throughout)."""
    if not cfg.progressive_start_size:
        return None
    end_epoch = cfg.progressive_end_epoch if cfg.progressive_end_epoch is not None else epochs
    return ResolutionSchedule(cfg.progressive_start_size, cfg.image_size, cfg.progressive_start_epoch, end_epoch,
                              cfg.progressive_step)
