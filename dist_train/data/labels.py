"""A sample's label, read from its shard members, for one-label (multiclass) or multi-label data.

    multiclass   `.cls` holds one integer as decimal text (webdataset's convention): "3"
    multilabel   `.cls` holds the labels separated by commas ("3,7"; "" for none), or a
                 `.json` member holds them as a list ([3, 7]) or {"labels": [3, 7]}

A label is ASCII decimal digits and nothing else (not `+3`, `1_0` or `³`, which Python's int()
would take); a member longer than 64 KiB is refused whole, never cut and its prefix parsed.
Every label must lie in 0..num_classes-1; a multi-label sample's list may be empty only with
`data.allow_empty_labels`, and hold no more labels than there are classes. Errors are one line
naming the sample (`where`: shard and key). The same reader checks labels at indexing
(data/resolve.py) and decodes them in the pipeline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dist_train.config import DataConfig
from dist_train.errors import DataError

LABEL_MEMBERS = ("cls", "json")  # where a sample's label may be; multiclass reads `.cls` only
MAX_LABEL_BYTES = 1 << 16  # a label member longer than this is not a label list
_DECIMAL = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class LabelReader:
    num_classes: int  # 0: unknown yet (labels are only checked to be >= 0)
    multilabel: bool = False
    allow_empty: bool = True

    def member(self, members: Mapping[str, object]) -> str | None:
        """Which of the sample's members holds its label (None: it has none)."""
        return next((m for m in (LABEL_MEMBERS if self.multilabel else ("cls",)) if m in members), None)

    def missing(self) -> str:
        return "has no .cls or .json label" if self.multilabel else "has no .cls label"

    def read(self, raw: bytes, member: str, where: str) -> int | tuple[int, ...]:
        """The label (multiclass) or the sorted labels (multilabel) of one sample."""
        if len(raw) > MAX_LABEL_BYTES:
            raise DataError(f"{where}: its .{member} label member is longer than {MAX_LABEL_BYTES} bytes: not a label")
        if not self.multilabel:
            return self._one(raw, where)
        labels = self._json_list(raw, where) if member == "json" else self._cls_list(raw, where)
        if not labels and not self.allow_empty:
            raise DataError(f"{where}: an empty label list (data.allow_empty_labels=false)")
        if self.num_classes and len(labels) > self.num_classes:
            raise DataError(f"{where}: {len(labels)} labels, more than data.num_classes={self.num_classes}")
        for label in labels:
            self._check_range(label, where)
        return tuple(sorted(set(labels)))

    def target(self, label: int | tuple[int, ...]):
        """What the loss takes: the class index, or a multi-hot float vector."""
        if not self.multilabel:
            return label
        import torch  # here: resolving a dataset (before training) needs no torch, and starts faster

        hot = torch.zeros(self.num_classes)
        hot[list(label)] = 1.0
        return hot

    def _one(self, raw: bytes, where: str) -> int:
        text = raw.decode("ascii", "replace").strip()
        if "," in text:
            raise DataError(f"{where}: label {raw[:20]!r} is a list: a multi-label sample, and data.task is "
                            "multiclass (set data.task=multilabel)")
        if not _DECIMAL.fullmatch(text):
            raise DataError(f"{where}: label {raw[:20]!r} is not an integer (decimal digits)")
        label = int(text)
        self._check_range(label, where)
        return label

    def _cls_list(self, raw: bytes, where: str) -> list[int]:
        text = raw.decode("ascii", "replace").strip()
        parts = [part.strip() for part in text.split(",")] if text else []
        if not all(_DECIMAL.fullmatch(part) for part in parts):
            raise DataError(f"{where}: label {raw[:20]!r} is not a comma-separated list of integers")
        return [int(part) for part in parts]

    def _json_list(self, raw: bytes, where: str) -> list[int]:
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested thousands deep
            raise DataError(f"{where}: .json label {raw[:20]!r} is not JSON (or nested too deep)") from None
        if isinstance(value, dict):
            value = value.get("labels")
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise DataError(f"{where}: .json label {raw[:20]!r} is not a list of integers (or {{\"labels\": [...]}})")
        return value

    def _check_range(self, label: int, where: str) -> None:
        if label < 0 or (self.num_classes and label >= self.num_classes):
            raise DataError(f"{where}: label {label} is outside 0..{self.num_classes - 1} (data.num_classes)")


def label_reader(cfg: DataConfig, num_classes: int) -> LabelReader:
    """The reader of the config's task, for a dataset of `num_classes` classes (0: unknown yet)."""
    return LabelReader(num_classes, cfg.task == "multilabel", cfg.allow_empty_labels)


def class_counts(labels: list[int | tuple[int, ...]], num_classes: int = 0) -> tuple[int, ...]:
    """Samples per class (multi-label: images carrying each label); at least `num_classes` long."""
    flat = [c for label in labels for c in (label if isinstance(label, tuple) else (label,))]
    return tuple(np.bincount(np.asarray(flat, dtype=np.int64), minlength=num_classes).tolist())


def summed_counts(counts: list[tuple[int, ...]], num_classes: int = 0) -> tuple[int, ...]:
    """Class counts of several shards added up (shorter ones padded with zeros)."""
    total = np.zeros(max([num_classes, *map(len, counts)]), dtype=np.int64)
    for one in counts:
        total[: len(one)] += one
    return tuple(total.tolist())
