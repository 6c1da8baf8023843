"""What `data.on_error=skip` left out of a run: shown once at the start, counted every epoch."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from dist_train.data.datasets import Datasets


def damage_record(on_error: str, accelerator: Accelerator, datasets: Datasets, train_stream,
                  val_stream) -> dict[str, int]:
    """With data.on_error=skip, the damaged samples left out: those found while indexing (the
    same on every rank) plus those that failed to decode since the last call on any rank
    (collective). Empty with data.on_error=raise."""
    if on_error != "skip":
        return {}
    read_here = train_stream.skipped.take() + val_stream.skipped.take()
    read = accelerator.reduce(torch.tensor([read_here], device=accelerator.device), "sum").item()
    return {"data/skipped_samples": datasets.skipped_samples + int(read)}


def report_damage(accelerator: Accelerator, datasets: Datasets, shown: int = 10) -> None:
    damage = datasets.damage
    if not damage:
        return
    unknown = sum(d.rest_unknown for d in damage)
    rest = (f", and the unread rest of {unknown} shard(s) cut short (no dataset.json gives their sample count)"
            if unknown else "")
    accelerator.print(f"dist-train: data.on_error=skip: left out {datasets.skipped_samples} damaged "
                      f"samples{rest} ({len(damage)} problems):")
    for d in damage[:shown]:
        accelerator.print(f"  {d.where}: {d.problem}" + (f" ({d.samples} samples)" if d.samples > 1 else ""))
    if len(damage) > shown:
        accelerator.print(f"  ... and {len(damage) - shown} more")
