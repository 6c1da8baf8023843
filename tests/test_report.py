from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import classification_report, confusion_matrix

from dist_train.training.report import format_table, per_class_scores


def parse_table(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines()[2:]:
        parts = line.split()
        if not parts:
            continue
        columns = 2 if parts[0] == "accuracy" else 4  # name, then precision recall f1 support
        rows[" ".join(parts[:-columns])] = [float(p) for p in parts[-columns:]]
    return rows


@pytest.mark.parametrize("seed", [0, 1])
def test_per_class_table_matches_sklearn_classification_report(seed):
    rng = np.random.default_rng(seed)
    names = ["cat", "dog", "bird", "fish", "never-predicted"]
    y_true = rng.integers(0, 5, 500)
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.integers(0, 4, 500))  # class 4 never predicted
    matrix = confusion_matrix(y_true, y_pred, labels=range(5)).tolist()
    expected = classification_report(y_true, y_pred, labels=range(5), target_names=names, output_dict=True,
                                      zero_division=0)
    scores = per_class_scores(matrix, names)
    for s in scores:
        ref = expected[s.name]
        assert (s.precision, s.recall, s.f1, s.support) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"], ref["support"]), abs=1e-12)
    table = parse_table(format_table(scores))
    for name in (*names, "macro avg", "weighted avg"):
        ref = expected[name]
        assert table[name] == pytest.approx([ref["precision"], ref["recall"], ref["f1-score"], 500 if "avg" in name
                                             else ref["support"]], abs=5e-5), name
    assert table["accuracy"] == pytest.approx([expected["accuracy"], 500], abs=5e-5)
