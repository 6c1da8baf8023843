"""Mixup and CutMix of training micro-batches: torchvision.transforms.v2's MixUp and CutMix,
drawn reproducibly.

    data.mixup_alpha, data.cutmix_alpha  Beta(alpha, alpha) for the mixing ratio; 0: that one off
    data.mix_prob                        probability that a micro-batch is mixed at all
    data.mix_switch_prob                 with both on: probability of CutMix rather than Mixup

These are timm's Mixup semantics (`prob`, `switch_prob`); the mixing itself is torchvision's:
each image is blended with (or gets a box pasted from) the next one in its micro-batch, and the
labels become the same blend of one-hot vectors. The loss then takes probabilities: PyTorch's
cross-entropy does, and its label smoothing applies on top of the soft targets (torchvision's
reference recipe composes them the same way); focal loss does not (a config error).

Every draw comes from the global random state's fork, seeded by (seed, step, micro-batch):
a resumed run mixes exactly as an uninterrupted one, and nothing else's random stream moves.
Images are paired within a micro-batch, as in timm and torchvision's references. The
micro-batch is numbered by the samples it holds (rank r's micro-batch k of K is the global
batch's (r*K + k)-th run of b samples, data/order.py), so W processes x K micro-batches of b
samples mix exactly as 1 x W*K: W x K x b equivalence holds with mixing on, for a given b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from dist_train.config import DataConfig
from dist_train.runtime.seeds import derive_seed


class BatchMixer:
    def __init__(self, cfg: DataConfig, num_classes: int, seed: int, rank: int, grad_accum_steps: int):
        self.mixup = v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes) if cfg.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes) if cfg.cutmix_alpha > 0 else None
        self.prob, self.switch_prob = cfg.mix_prob, cfg.mix_switch_prob
        self.num_classes, self.seed = num_classes, seed
        self.first_micro_batch = rank * grad_accum_steps  # of this rank's, in the global batch

    def at_step(self, step: int):
        """The mixing of optimizer step `step`: (images, labels, micro-batch index) -> (images,
        soft labels)."""
        return lambda images, labels, micro: self(images, labels, step, micro)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int, micro: int):
        with torch.random.fork_rng(devices=[]):  # the CPU stream only: torchvision draws there
            torch.manual_seed(derive_seed(self.seed, step, self.first_micro_batch + micro))
            mix, choice = torch.rand(2).tolist()
            if mix >= self.prob:
                return images, F.one_hot(labels, self.num_classes).float()  # what the mixed get
            use_cutmix = self.mixup is None or (self.cutmix is not None and choice < self.switch_prob)
            return (self.cutmix if use_cutmix else self.mixup)(images, labels)


def make_mixer(cfg: DataConfig, num_classes: int, seed: int, rank: int = 0,
               grad_accum_steps: int = 1) -> BatchMixer | None:
    if cfg.mixup_alpha == 0 and cfg.cutmix_alpha == 0:
        return None
    return BatchMixer(cfg, num_classes, seed, rank, grad_accum_steps)
