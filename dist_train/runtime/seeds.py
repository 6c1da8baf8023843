"""Seeds derived on purpose: every random draw of the data order, augmentation and mixing is
seeded by a function of (seed, epoch, position, ...), never by a process's global random
state, so that it is the same on any number of processes and workers and after a resume.
The model's own draws (dropout, drop path) too: `ForwardSeeds`."""

from __future__ import annotations

import hashlib

import torch

FORWARD_STREAM = 13  # keeps the forward pass's seeds apart from mixing's, derived from the same (seed, step, micro)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, epoch, position...), well mixed and cheap
    (about a microsecond: it is computed for every training sample)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ForwardSeeds:
    """Seeds the training device's generator before each micro-batch's forward pass from (seed,
    optimizer step, the micro-batch's index in the global batch: rank r's k-th of K is r*K + k).

    Dropout and stochastic depth then draw the same masks for a micro-batch whichever process
    runs it: W processes x K micro-batches train exactly like 1 x W*K (for the same b) with them
    on, and a resume on another process count continues the same draws (a rank's own random
    state, restored only on the same count, no longer decides them)."""

    def __init__(self, seed: int, rank: int, grad_accum_steps: int, device: torch.device):
        self.seed = seed
        self.first_micro_batch = rank * grad_accum_steps
        if device.type == "cuda":
            torch.cuda.init()  # fills torch.cuda.default_generators (the model is on the device already)
            self.generator = torch.cuda.default_generators[device.index or torch.cuda.current_device()]
        else:
            self.generator = torch.default_generator

    def at_step(self, step: int):
        """What train_step calls with each micro-batch's index (0..K-1) at optimizer step `step`."""
        return lambda micro: self.generator.manual_seed(
            derive_seed(self.seed, step, self.first_micro_batch + micro, FORWARD_STREAM))
