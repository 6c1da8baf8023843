"""Progressive resizing (data/resolution.py): the training crop as a pure function of the
optimizer step, FFCV's schedule, and batches that do not depend on the process layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_train.config import DataConfig, load_config
from dist_train.data.resolution import ResolutionSchedule, resolution_schedule
from dist_train.errors import ConfigError

from .test_order import batches


def ffcv_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int, start_ramp: int) -> int:
    """FFCV's ResNet-50 example, `get_resolution` (rn50 configs: 160 -> 192, epochs 65 -> 76 of 88)."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


def test_at_each_epochs_start_the_size_is_ffcvs():
    cfg = DataConfig(image_size=192, progressive_start_size=160, progressive_start_epoch=65, progressive_end_epoch=76)
    schedule = resolution_schedule(cfg, epochs=88)
    for epoch in range(88):
        assert schedule.size_at(epoch, 0, 1000) == ffcv_resolution(epoch, 160, 192, 76, 65), epoch
    assert schedule.sizes(1000, 88) == [160, 192]
    # Per step, not per epoch: the switch comes inside epoch 70, where the ramp passes 176.
    first = schedule.first_step_at(192, 1000, 88)
    assert 70_000 < first < 71_000 and schedule.size_at(*divmod(first - 1, 1000), 1000) == 160


def test_sizes_are_rounded_to_the_step_and_never_past_the_ends():
    schedule = ResolutionSchedule(start=8, end=18, start_epoch=0, end_epoch=1, step=4)
    sizes = [schedule.size_at(0, s, 100) for s in range(100)] + [schedule.size_at(1, 0, 100)]
    assert sizes == sorted(sizes) and set(sizes) == {8, 12, 16, 18}  # 20 would pass the end


def test_a_ramp_must_end_after_it_starts_and_within_the_run():
    with pytest.raises(ConfigError, match="progressive_end_epoch"):
        load_config(None, ["data.progressive_start_size=128", "data.progressive_start_epoch=5",
                           "data.progressive_end_epoch=4"])
    with pytest.raises(ConfigError, match="decode_on_device crops at one size"):
        load_config(None, ["data.progressive_start_size=128", "data.decode_on_device=true"])


@pytest.mark.slow
def test_global_batches_of_one_process_equal_two_ranks_as_the_size_changes_mid_epoch(digits_dir):
    """Digits at 4 -> 8 px (44 steps of 32 an epoch): the size changes at steps 10 and 21;
    1 process x 4 micro-batches of 8 takes what 2 ranks x 2 take, at each step's size, and a
    loader started at step 15 reads what the whole epoch's did from there."""
    schedule = ResolutionSchedule(start=4, end=8, start_epoch=1.2, end_epoch=1.5, step=2)
    steps = 1438 // 32
    sizes = [schedule.size_at(1, s, steps) for s in range(steps)]
    assert sizes.count(4) and sizes.count(6) and sizes.count(8)
    whole = batches(digits_dir, workers=1, accum=4, resolution=schedule)
    ranks = [batches(digits_dir, workers=2, world=2, rank=r, accum=2, resolution=schedule) for r in range(2)]
    for step in range(steps):
        x1 = torch.cat([whole[4 * step + m][0] for m in range(4)])
        x2 = torch.cat([ranks[r][2 * step + m][0] for r in range(2) for m in range(2)])
        y1 = torch.cat([whole[4 * step + m][1] for m in range(4)])
        y2 = torch.cat([ranks[r][2 * step + m][1] for r in range(2) for m in range(2)])
        assert x1.shape[-1] == sizes[step] and torch.equal(x1, x2) and torch.equal(y1, y2)
    restarted = batches(digits_dir, workers=2, start_step=15, accum=4, resolution=schedule)
    for (x, y), (x2, y2) in zip(whole[4 * 15:], restarted, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
