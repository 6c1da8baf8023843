"""Mixup and CutMix are torchvision's, drawn from a seed of (seed, step, rank, micro-batch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from dist_train.config import DataConfig, LossConfig, load_config
from dist_train.data.order import derive_seed
from dist_train.errors import ConfigError
from dist_train.recipe.losses import build_loss
from dist_train.recipe.mixing import make_mixer

from .conftest import DIGITS_CONFIG


def batch(seed: int = 0, n: int = 6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize(("settings", "reference"), [
    ({"mixup_alpha": 0.4}, lambda: v2.MixUp(alpha=0.4, num_classes=10)),
    ({"cutmix_alpha": 1.0}, lambda: v2.CutMix(alpha=1.0, num_classes=10)),
    ({"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "mix_switch_prob": 1.0}, lambda: v2.CutMix(alpha=1.0, num_classes=10)),
    ({"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "mix_switch_prob": 0.0}, lambda: v2.MixUp(alpha=0.4, num_classes=10)),
])
def test_the_mixing_is_torchvisions_from_the_steps_seed(settings, reference):
    mixer = make_mixer(DataConfig(**settings), num_classes=10, seed=7, rank=1, grad_accum_steps=4)
    images, labels = batch()
    ours = mixer.at_step(12)(images, labels, 3)
    torch.manual_seed(derive_seed(7, 12, 1 * 4 + 3))  # the global batch's 8th micro-batch
    torch.rand(2)  # the draws that decide whether, and how, to mix
    expected = reference()(images, labels)
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])
    assert ours[1].shape == (6, 10) and torch.allclose(ours[1].sum(1), torch.ones(6))


def test_a_micro_batch_mixes_alike_whatever_the_processes_and_accumulation():
    """W x K x b: rank 1's only micro-batch of 2 processes holds the samples of 1 process's
    second micro-batch of 2: mixed alike."""
    cfg = DataConfig(mixup_alpha=0.4, cutmix_alpha=1.0)
    images, labels = batch()
    two_processes = make_mixer(cfg, 10, seed=3, rank=1, grad_accum_steps=1)(images, labels, step=9, micro=0)
    one_process = make_mixer(cfg, 10, seed=3, rank=0, grad_accum_steps=2)(images, labels, step=9, micro=1)
    assert torch.equal(two_processes[0], one_process[0]) and torch.equal(two_processes[1], one_process[1])


def test_draws_leave_the_global_random_state_alone_and_repeat_for_a_step():
    mixer = make_mixer(DataConfig(mixup_alpha=0.4, cutmix_alpha=1.0), num_classes=10, seed=0, rank=0)
    images, labels = batch()
    state = torch.get_rng_state()
    first = mixer(images, labels, step=5, micro=0)
    assert torch.equal(torch.get_rng_state(), state)
    again = mixer(images, labels, step=5, micro=0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    others = [mixer(images, labels, step=s, micro=m)[1] for s, m in ((6, 0), (5, 1), (7, 2))]
    assert not all(torch.equal(first[1], other) for other in others)


def test_mix_prob_leaves_some_micro_batches_unmixed_with_one_hot_labels():
    mixer = make_mixer(DataConfig(mixup_alpha=0.4, mix_prob=0.5), num_classes=10, seed=0, rank=0)
    images, labels = batch()
    unmixed = 0
    for step in range(200):
        out, soft = mixer(images, labels, step=step, micro=0)
        if torch.equal(out, images):
            unmixed += 1
            assert torch.equal(soft, F.one_hot(labels, 10).float())
    assert 70 < unmixed < 130


@pytest.mark.parametrize(("loss", "smoothing"), [("cross_entropy", 0.0), ("label_smoothing", 0.1)])
def test_the_soft_target_loss_is_the_formula_with_and_without_label_smoothing(loss, smoothing):
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    _, soft = make_mixer(DataConfig(mixup_alpha=0.4), 10, 0, 0)(*batch(), step=0, micro=0)
    assert not torch.equal(soft, F.one_hot(soft.argmax(1), 10).float())  # really mixed
    value = build_loss(LossConfig(name=loss, label_smoothing=smoothing))(logits, soft)
    smoothed = (1 - smoothing) * soft + smoothing / 10
    assert torch.allclose(value, -(smoothed * F.log_softmax(logits, 1)).sum(1).mean())


def test_focal_loss_with_mixing_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^data.mixup_alpha / data.cutmix_alpha make soft labels, which "
                                          r"loss.name=focal does not take"):
        load_config(DIGITS_CONFIG, ["loss.name=focal", "data.cutmix_alpha=1.0"])
    assert make_mixer(DataConfig(), 10, 0, 0) is None
