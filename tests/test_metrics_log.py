"""metrics.jsonl after a write cut short (a full disk, a kill): the run still resumes and reports."""

from __future__ import annotations

import json

import pytest

from dist_train.errors import DataError
from dist_train.training.tracking import read_metrics, truncate_metrics

RECORDS = [{"epoch": 0, "step": 5, "train/loss": 1.5}, {"epoch": 0, "step": 10, "val/acc": float("nan")}]


def lines(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_a_last_line_cut_short_is_left_out_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines(RECORDS) + '{"epoch": 1, "step": 15, "train/lo')
    with pytest.warns(UserWarning, match="last line is cut short"):
        assert [r["step"] for r in read_metrics(path)] == [5, 10]
    with pytest.warns(UserWarning):
        truncate_metrics(path, last_step=10)  # what a resume does
    assert path.read_text() == lines(RECORDS)  # the complete lines, byte for byte


def test_a_bad_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(lines(RECORDS[:1]) + "garbage\n" + lines(RECORDS[1:]))
    with pytest.raises(DataError, match=r"metrics\.jsonl: line 2 is not a JSON record"):
        read_metrics(path)
