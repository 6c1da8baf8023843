from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_train.config import LossConfig
from dist_train.recipe.losses import FocalLoss, build_loss


def focal_by_formula(logits, target, gamma, alpha=None):
    """-alpha_y (1 - p_y)^gamma log p_y, averaged, written out sample by sample."""
    total = 0.0
    for row, y in zip(logits.tolist(), target.tolist(), strict=True):
        denom = sum(math.exp(v) for v in row)
        p = math.exp(row[y]) / denom
        weight = alpha[y] if alpha else 1.0
        total += -weight * (1 - p) ** gamma * math.log(p)
    return total / len(target)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, [0.25, 1.0, 2.0, 0.5]])
def test_focal_loss_matches_its_formula(gamma, alpha):
    torch.manual_seed(0)
    logits = torch.randn(16, 4, dtype=torch.float64) * 3
    target = torch.randint(0, 4, (16,))
    loss = FocalLoss(gamma, alpha)(logits, target)
    assert loss.item() == pytest.approx(focal_by_formula(logits, target, gamma, alpha), rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits = torch.randn(32, 5)
    target = torch.randint(0, 5, (32,))
    assert torch.allclose(FocalLoss(0.0)(logits, target), nn.functional.cross_entropy(logits, target), atol=1e-6)


def test_focal_down_weights_easy_examples():
    target = torch.tensor([0])
    easy, hard = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.2, 0.0]])
    ce = nn.CrossEntropyLoss()
    ratio_easy = FocalLoss(2.0)(easy, target) / ce(easy, target)
    ratio_hard = FocalLoss(2.0)(hard, target) / ce(hard, target)
    assert ratio_easy < 0.001 < ratio_hard


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.3])
def test_label_smoothing_matches_torch_and_formula(eps):
    torch.manual_seed(1)
    logits = torch.randn(20, 7)
    target = torch.randint(0, 7, (20,))
    loss = build_loss(LossConfig(name="label_smoothing", label_smoothing=eps))(logits, target)
    reference = nn.CrossEntropyLoss(label_smoothing=eps)(logits, target)
    log_p = logits.log_softmax(dim=1)
    # (1 - eps) * CE + eps * mean over classes of -log p_k
    formula = ((1 - eps) * -log_p.gather(1, target[:, None]).squeeze(1) - eps * log_p.mean(dim=1)).mean()
    assert torch.allclose(loss, reference, atol=1e-6)
    assert torch.allclose(loss, formula, atol=1e-6)


def test_build_loss_picks_by_name():
    assert isinstance(build_loss(LossConfig(name="cross_entropy")), nn.CrossEntropyLoss)
    focal = build_loss(LossConfig(name="focal", focal_gamma=3.0, focal_alpha=[1.0, 2.0]))
    assert isinstance(focal, FocalLoss) and focal.gamma == 3.0 and focal.alpha.tolist() == [1.0, 2.0]
