from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from dist_train.recipe.metrics import MultilabelValidationMetrics, ValidationMetrics


def sklearn_reference(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    probs = logits.double().softmax(dim=1).numpy()
    pred = probs.argmax(axis=1)
    y = labels.numpy()
    classes = list(range(num_classes))
    top5 = {"val/acc_top5": skm.top_k_accuracy_score(y, probs, k=5, labels=classes)} if num_classes > 5 else {}
    return {
        "val/acc": skm.accuracy_score(y, pred),
        **top5,
        "val/f1_macro": skm.f1_score(y, pred, average="macro", labels=classes, zero_division=0),
        "val/precision_macro": skm.precision_score(y, pred, average="macro", labels=classes, zero_division=0),
        "val/recall_macro": skm.recall_score(y, pred, average="macro", labels=classes, zero_division=0),
        "val/auroc_macro": skm.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=classes),
        "val/loss": skm.log_loss(y, probs, labels=classes),
    }


def sklearn_multilabel_reference(logits: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5
                                 ) -> tuple[dict[str, float], dict[str, list]]:
    """scikit-learn's multi-label scores: (the run's scalars, per-label AP and AUROC)."""
    probs = logits.double().sigmoid().numpy()
    y = labels.numpy().astype(int)
    pred = (probs >= threshold).astype(int)
    per_label_ap = skm.average_precision_score(y, probs, average=None)
    per_label_auroc = skm.roc_auc_score(y, probs, average=None)
    bce = -(y * np.log(probs) + (1 - y) * np.log1p(-probs)).sum(axis=1).mean()
    return {
        "val/map_macro": float(np.mean(per_label_ap)),
        "val/f1_micro": skm.f1_score(y, pred, average="micro", zero_division=0),
        "val/f1_macro": skm.f1_score(y, pred, average="macro", zero_division=0),
        "val/subset_acc": skm.accuracy_score(y, pred),  # all labels right
        "val/auroc_macro": float(np.mean(per_label_auroc)),
        "val/loss": float(bce),
    }, {"ap": per_label_ap.tolist(), "auroc": per_label_auroc.tolist(),
        "confusion": skm.multilabel_confusion_matrix(y, pred).tolist()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_metrics_match_scikit_learn(seed):
    num_labels = 6
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(997, num_labels, generator=gen) < torch.linspace(0.05, 0.6, num_labels)).float()
    logits = torch.randn(997, num_labels, generator=gen) + 2.0 * (labels - 0.5)
    metrics = MultilabelValidationMetrics(num_labels, threshold=0.4)
    for chunk in torch.split(torch.arange(997), [100, 300, 1, 596]):
        metrics.update(logits[chunk], labels[chunk])
    values, per_label = metrics.compute()
    expected, expected_per_label = sklearn_multilabel_reference(logits, labels, threshold=0.4)
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, abs=1e-5), name
    assert np.allclose(per_label["ap"], expected_per_label["ap"], atol=1e-5)
    assert np.allclose(per_label["auroc"], expected_per_label["auroc"], atol=1e-5)
    assert per_label["confusion"] == expected_per_label["confusion"]


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


def test_top5_stays_apart_when_a_first_batch_is_all_right():
    """A MetricCollection merges metrics whose states are equal after the first update: top-1
    and top-5 counts are equal on a batch where every top-1 is right, and merged they would
    report one another's values from then on."""
    num_classes = 10
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, num_classes, (301,), generator=gen)
    logits = torch.randn(301, num_classes, generator=gen) + 1.0 * torch.nn.functional.one_hot(labels, num_classes)
    logits[:32] += 50 * torch.nn.functional.one_hot(labels[:32], num_classes)  # the first batch: all right
    metrics = ValidationMetrics(num_classes)
    for chunk in torch.split(torch.arange(301), [32, 100, 169]):
        metrics.update(logits[chunk], labels[chunk])
    values, _ = metrics.compute()
    for name, value in sklearn_reference(logits, labels, num_classes).items():
        assert values[name] == pytest.approx(value, abs=1e-5), name
    assert values["val/acc_top5"] > values["val/acc"]


def test_without_auroc_validation_keeps_counts_only_and_the_rest_is_unchanged():
    """train.auroc=false: the other metrics as scikit-learn computes them, and no state that
    grows with the validation set (exact AUROC keeps every prediction)."""
    num_classes = 12
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, num_classes, (997,), generator=gen)
    logits = torch.randn(997, num_classes, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, num_classes)
    metrics = ValidationMetrics(num_classes, auroc=False)
    for chunk in torch.split(torch.arange(997), [100, 300, 1, 596]):
        metrics.update(logits[chunk], labels[chunk])
    states = [getattr(metric, name) for metric in [*metrics.scores.values(), metrics.top_k, metrics.confusion]
              for name in metric._defaults]
    assert states and all(isinstance(state, torch.Tensor) and state.numel() <= num_classes**2 for state in states)
    values, _ = metrics.compute()
    expected = sklearn_reference(logits, labels, num_classes)
    del expected["val/auroc_macro"]
    assert set(values) == set(expected)
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, abs=1e-5), name
