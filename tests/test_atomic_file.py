"""Output files are replaced whole or not at all: a failure halfway keeps the previous file."""

from __future__ import annotations

import pytest

from dist_train import atomic_file


def test_a_complete_write_replaces_the_file(tmp_path):
    path = tmp_path / "summary.md"
    path.write_text("old")
    atomic_file.write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failure_halfway_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path, failure):
    path = tmp_path / "preds.csv"
    path.write_text("source,label\nkept,1\n")
    with pytest.raises(type(failure)), atomic_file.replacing(path) as tmp:
        tmp.write_text("source,label\n")  # the header, then the failure
        raise failure
    assert path.read_text() == "source,label\nkept,1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]
