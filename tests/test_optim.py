from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_train.config import OptimConfig, SchedConfig
from dist_train.recipe.optim import Schedule, build_optimizer

STEPS_PER_EPOCH = 10
EPOCHS = 6


def lr_sequence(cfg: SchedConfig, lr: float = 0.1, steps: int = STEPS_PER_EPOCH * EPOCHS) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    schedule = Schedule(optimizer, cfg, STEPS_PER_EPOCH, EPOCHS)
    lrs = []
    for _ in range(steps):
        lrs.append(schedule.lr)
        optimizer.step()
        schedule.after_optimizer_step()
    return lrs


def torch_sequence(make_scheduler, lr: float = 0.1, steps: int = STEPS_PER_EPOCH * EPOCHS) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_step_schedule_equals_torch_steplr():
    ours = lr_sequence(SchedConfig(name="step", step_size_epochs=2, gamma=0.5))
    theirs = torch_sequence(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2 * STEPS_PER_EPOCH, gamma=0.5))
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert ours[0] == 0.1 and ours[20] == 0.05 and ours[40] == 0.025


def test_cosine_schedule_equals_torch_cosine_annealing():
    total = STEPS_PER_EPOCH * EPOCHS
    ours = lr_sequence(SchedConfig(name="cosine", min_lr=0.001))
    theirs = torch_sequence(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=0.001))
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert ours[0] == pytest.approx(0.1) and ours[total // 2] == pytest.approx(0.0505)


def test_linear_warmup_then_cosine():
    warmup, total = 15, STEPS_PER_EPOCH * EPOCHS  # warmup_epochs=1.5 -> 15 steps
    ours = lr_sequence(SchedConfig(name="cosine", warmup_epochs=1.5, warmup_start_factor=0.1))
    for t in range(warmup):
        assert ours[t] == pytest.approx(0.1 * (0.1 + 0.9 * t / warmup))
    for t in range(warmup, total):
        assert ours[t] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))))
    assert max(ours) == pytest.approx(0.1) and ours.index(max(ours)) == warmup


def test_linear_warmup_then_step():
    ours = lr_sequence(SchedConfig(name="step", warmup_epochs=1, step_size_epochs=3, gamma=0.1))
    assert ours[0] == pytest.approx(0.001) and ours[5] == pytest.approx(0.1 * (0.01 + 0.99 * 0.5))
    assert ours[10:30] == pytest.approx([0.1] * 20)
    assert ours[30:] == pytest.approx([0.01] * 30)


def test_constant_schedule():
    assert lr_sequence(SchedConfig(name="constant")) == [0.1] * (STEPS_PER_EPOCH * EPOCHS)


def test_plateau_cuts_lr_when_monitored_metric_stalls():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    cfg = SchedConfig(name="plateau", plateau_patience=1, plateau_factor=0.5,
                      plateau_monitor="val/acc", plateau_mode="max")
    schedule = Schedule(optimizer, cfg, STEPS_PER_EPOCH, EPOCHS)
    seen = []
    for acc in [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7]:
        schedule.after_optimizer_step()  # must not change the LR
        schedule.after_validation({"val/acc": acc, "val/loss": 1.0})
        seen.append(schedule.lr)
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])


def test_weight_decay_skips_biases_and_norms_by_default():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    groups = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.1), (3, 0.0)]
    groups = build_optimizer(model, OptimConfig(weight_decay=0.1, decay_norm_and_bias=True)).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(4, 0.1)]
    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, betas=[0.8, 0.9]))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)


def test_layer_decay_and_the_head_multiplier_set_each_parameters_lr_by_the_formula():
    """resnet18: conv1, bn1, 8 residual blocks, fc = 11 layers; layer i trains at
    lr * decay^(10 - i), the head (fc) at lr * head_lr_mult."""
    import torchvision

    from dist_train.recipe.optim import layer_ids

    model = torchvision.models.resnet18(num_classes=10)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1, layer_decay=0.75, head_lr_mult=10.0))
    layers, count = layer_ids(model)
    assert count == 11 and layers["conv1.weight"] == 0 and layers["layer1.1.conv2.weight"] == 3
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = 0.1 * (10.0 if name.startswith("fc.") else 0.75 ** (10 - layers[name]))
        assert lr_of[id(param)] == pytest.approx(expected, rel=1e-12), name
    schedule = Schedule(optimizer, SchedConfig(name="cosine", warmup_epochs=0), steps_per_epoch=10, epochs=1)
    for _ in range(5):
        schedule.after_optimizer_step()
    factor = 0.5 * (1 + math.cos(math.pi * 5 / 10))
    assert schedule.lr == pytest.approx(0.1 * factor)  # the base LR, whatever the groups' scales
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.1 * group["lr_scale"] * factor)


def test_a_timm_models_layers_are_its_own_blocks():
    from dist_train.recipe.models import create_model
    from dist_train.recipe.optim import layer_ids

    layers, count = layer_ids(create_model("timm/convnext_atto", 10))
    assert count == 14 and layers["stem.0.weight"] == 0 and layers["head.fc.weight"] == 13
