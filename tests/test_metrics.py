from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from dist_train.metrics import ValidationMetrics


def sklearn_reference(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    probs = logits.double().softmax(dim=1).numpy()
    pred = probs.argmax(axis=1)
    y = labels.numpy()
    classes = list(range(num_classes))
    return {
        "val/acc": skm.accuracy_score(y, pred),
        "val/f1_macro": skm.f1_score(y, pred, average="macro", labels=classes, zero_division=0),
        "val/precision_macro": skm.precision_score(y, pred, average="macro", labels=classes, zero_division=0),
        "val/recall_macro": skm.recall_score(y, pred, average="macro", labels=classes, zero_division=0),
        "val/auroc_macro": skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=classes),
        "val/loss": skm.log_loss(y, probs, labels=classes),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    num_classes = 5
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (997,), generator=gen)
    # Informative but imperfect predictions, fed in uneven batches.
    logits = torch.randn(997, num_classes, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, num_classes)
    metrics = ValidationMetrics(num_classes)
    for chunk in torch.split(torch.arange(997), [100, 300, 1, 596]):
        metrics.update(logits[chunk], labels[chunk])
    values, confusion = metrics.compute()
    expected = sklearn_reference(logits, labels, num_classes)
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, abs=1e-5), name
    reference = skm.confusion_matrix(labels, logits.argmax(1), labels=range(num_classes))
    assert np.array_equal(np.array(confusion), reference)


def test_reset_forgets_previous_epoch():
    metrics = ValidationMetrics(3)
    metrics.update(torch.tensor([[0.0, 9.0, 0.0]]), torch.tensor([0]))
    metrics.reset()
    metrics.update(torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]), torch.tensor([0, 1]))
    values, confusion = metrics.compute()
    assert values["val/acc"] == 1.0
    assert sum(map(sum, confusion)) == 2
