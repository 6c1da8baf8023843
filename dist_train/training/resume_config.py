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

import dataclasses
from typing import Any

from dist_train.config import RESUME_APPLIES_SECTIONS, Config, quoted, to_dict
from dist_train.errors import ConfigError

# A key, or a section ending in ".", whose new value a resumed run applies, and what follows:
# read from the config's own fields (`applied_on_resume` metadata in config.py).
APPLIED_ON_RESUME: dict[str, str] = {
    **{f"{section}.{key.name}": key.metadata["applied_on_resume"]
       for section, values in vars(Config()).items() for key in dataclasses.fields(values)
       if "applied_on_resume" in key.metadata},
    **{f"{section}.": "" for section in RESUME_APPLIES_SECTIONS},
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


def changes_what_follows(saved_config: dict[str, Any] | None, cfg: Config) -> list[str]:
    """The changed keys whose new value changes the records from the resume step on (those with
    a note: the LR re-planned, clipping, another batch split...), as opposed to where and how
    often the run reports (output_dir, tracking, log_every_steps, workers)."""
    if saved_config is None:
        return []
    before, after = _flatten(saved_config), _flatten(to_dict(cfg))
    return [key for key in after if key in before and before[key] != after[key] and _note(key)]


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
