"""What a resumed run may change in its config, and what it may not.

A resume restores the model, optimizer, schedule, random states and data order from the
checkpoint. A key those were built from cannot take a new value: it would be silently
overwritten by the saved state (a new `optim.lr` by the optimizer's saved LR, a new
`train.seed` by the saved order) or break the load (another `model.name`). Such a change is
refused in one line naming each key with both values, before anything is written. The keys
below are about how long, where and how the run goes on, not what it learns: their change
applies from the resume step on, and the run log says so.
"""

from __future__ import annotations

from typing import Any

from dist_train.config import Config, quoted, to_dict
from dist_train.errors import ConfigError

# A key, or a section ending in ".", whose new value a resumed run applies; and what follows.
APPLIED_ON_RESUME: dict[str, str] = {
    "train.epochs": "the LR schedule is re-planned for the new length",
    "train.resume": "",
    "train.output_dir": "",
    "train.cpu": "",
    "train.compile": "",
    "train.compile_mode": "",
    "train.progress_bar": "",
    "train.log_every_steps": "",
    "train.val_every_steps": "",
    "train.early_stop_patience": "validations without improvement so far still count",
    "train.checkpoint_every_steps": "",
    "train.checkpoint_every_epoch": "",
    "train.keep_checkpoints": "",
    "train.keep_best": "",
    "train.clip_grad_norm": "clipping changes from the resume step on",
    # The global batch is part of the saved order: these only lay it out over the processes.
    "data.batch_size": "the global batch is kept, the accumulation steps follow",
    "train.grad_accum_steps": "the global batch is kept, the accumulation steps follow",
    # The dataset may have moved; it is indexed and checked as at any start.
    "data.train": "",
    "data.val": "",
    "data.num_workers": "",
    "data.val_batch_size": "",
    "data.on_error": "damaged samples left out from here on change the order from here on",
    "data.max_skipped": "",
    "data.max_image_pixels": "",
    "data.decode_on_device": "images decoded by another decoder: the same crops, pixels rounded apart",
    "model.channels_last": "",
    "tracking.": "",
}
MAX_LISTED = 6  # changes named in one line


def check_resume_config(saved_config: dict[str, Any] | None, cfg: Config, checkpoint: str) -> list[str]:
    """The changes a resume applies ("key old -> new"), or ConfigError naming those it cannot.

    `saved_config` is the config the checkpoint was written with (its meta.json); None for a
    checkpoint that does not record one. Keys it lacks (added to dist-train since) pass."""
    if saved_config is None:
        return []
    before, after = _flatten(saved_config), _flatten(to_dict(cfg))
    changed = [key for key in after if key in before and before[key] != after[key]]
    refused = [key for key in changed if not _applies(key)]
    if refused:
        listed = ", ".join(_change(key, before, after) for key in refused[:MAX_LISTED])
        more = f" and {len(refused) - MAX_LISTED} more" if len(refused) > MAX_LISTED else ""
        raise ConfigError(
            f"train.resume: {checkpoint} was trained with other settings, which a resumed run cannot change: "
            f"{listed}{more}; resume with the checkpoint's values, or start a new run in another train.output_dir"
        )
    return [_change(key, before, after) + (f" ({_note(key)})" if _note(key) else "") for key in changed]


def _applies(key: str) -> bool:
    return key in APPLIED_ON_RESUME or any(p.endswith(".") and key.startswith(p) for p in APPLIED_ON_RESUME)


def _note(key: str) -> str:
    return APPLIED_ON_RESUME.get(key, "")


def _change(key: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    return f"{key} {quoted(before[key])} -> {quoted(after[key])}"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
