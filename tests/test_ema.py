"""The weights' moving average: torch.optim.swa_utils' EMA rule, timm's warmup, BatchNorm
statistics from the model, and a state that resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dist_train.recipe.ema import WeightsEma
from dist_train.recipe.models import create_model


def train_steps(model, steps: int, after_step) -> None:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        images = torch.randn(8, 1, 16, 16, generator=generator)
        labels = torch.randint(0, 10, (8,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step(model)


def test_the_average_is_torchs_ema_rule_step_for_step():
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 1)
    ours = WeightsEma(model, decay=0.9)
    reference = AveragedModel(copy.deepcopy(model), multi_avg_fn=get_ema_multi_avg_fn(0.9))

    def after_step(m):
        ours.update(m)
        reference.update_parameters(m)

    train_steps(model, 12, after_step)
    for (name, a), b in zip(ours.averaged.module.named_parameters(), reference.module.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(next(ours.averaged.module.parameters()), next(model.parameters()))


def test_warmup_follows_timms_decay_schedule():
    ema = WeightsEma(create_model("small_cnn", 10, 1), decay=0.999, warmup=True)
    assert [round(ema.decay_at(t), 6) for t in (1, 10, 100)] == [
        round(1 - 2 ** (-2 / 3), 6), round(1 - 11 ** (-2 / 3), 6), round(1 - 101 ** (-2 / 3), 6)]
    assert ema.decay_at(10**9) == 0.999


def test_batchnorm_statistics_are_the_models_not_averaged():
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 1)  # BatchNorm
    ema = WeightsEma(model, decay=0.99)
    train_steps(model, 3, ema.update)
    evaluated = ema.module_with_buffers_of(model)
    for (name, ours), theirs in zip(evaluated.named_buffers(), model.buffers(), strict=True):
        assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("warmup", [False, True])
def test_a_saved_average_resumes_exactly(warmup):
    torch.manual_seed(0)
    model = create_model("small_cnn_gn", 10, 1)
    start = copy.deepcopy(model.state_dict())
    ema = WeightsEma(model, decay=0.95, warmup=warmup)
    train_steps(model, 5, ema.update)
    saved = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ema.state_dict().items()}
    assert saved["updates"] == 5

    again = create_model("small_cnn_gn", 10, 1)
    again.load_state_dict(start)
    resumed = WeightsEma(again, decay=0.95, warmup=warmup)
    resumed.load_state_dict(saved)
    for _ in range(3):
        ema.update(model)
        resumed.update(model)
    assert resumed.updates == ema.updates == 8
    for a, b in zip(ema.averaged.module.parameters(), resumed.averaged.module.parameters(), strict=True):
        assert torch.equal(a, b)
