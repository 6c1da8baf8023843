"""Checkpoints: model checkpoints (best/, last/) and resumable ones built on them.

    atomic.py     the one atomic writer (temp name -> fsync -> hashes -> rename), the one verifier
    model.py      model.safetensors + meta.json: what eval, predict and fine-tuning read
    resumable.py  the whole training state at a step boundary (training/state.py says what it holds)
"""

from dist_train.checkpoint.atomic import sha256_file
from dist_train.checkpoint.model import load_model_checkpoint, save_model_checkpoint
from dist_train.checkpoint.resumable import (
    SavedState,
    find_resumable,
    load_resumable,
    save_resumable,
    saved_config,
    saved_meta,
    verify,
)

__all__ = [
    "SavedState",
    "find_resumable",
    "load_model_checkpoint",
    "load_resumable",
    "save_model_checkpoint",
    "save_resumable",
    "saved_config",
    "saved_meta",
    "sha256_file",
    "verify",
]
