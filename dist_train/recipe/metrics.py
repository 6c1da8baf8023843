"""Validation metrics from torchmetrics, exact across processes.

Accuracy (top-1, and top-5 with more than 5 classes), macro F1 / precision / recall and the
confusion matrix keep summed counts; AUROC (thresholds=None, exact; `train.auroc`, on by default)
keeps every prediction; the loss keeps a sum and a count. Each is synced
across ranks inside `compute()`, which every rank must call. Because each validation sample
is seen by exactly one rank (see data/eval_split.py), the synced values equal the single-process
values on the whole validation set.

Multi-label data (`MultilabelValidationMetrics`): mean average precision and AUROC per label
(thresholds=None: every prediction kept, exact), F1 micro and macro and subset accuracy at
`train.threshold` (summed counts), per-label confusion counts, and binary cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAUROC,
    MultilabelAveragePrecision,
    MultilabelConfusionMatrix,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from dist_train.config import TOP_K, Config


class ValidationMetrics:
    # The record key of the detail beside the scalars (here the confusion matrix).
    detail_key = "val/confusion_matrix"

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", auroc: bool = True):
        scores = {
            "val/acc": MulticlassAccuracy(num_classes, average="micro"),
            "val/f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "val/precision_macro": MulticlassPrecision(num_classes, average="macro"),
            "val/recall_macro": MulticlassRecall(num_classes, average="macro"),
        }
        if auroc:  # thresholds=None: exact AUROC; memory grows with the validation set
            scores["val/auroc_macro"] = MulticlassAUROC(num_classes, average="macro", thresholds=None)
        self.scores = MetricCollection(scores).to(device)
        self.confusion = MulticlassConfusionMatrix(num_classes).to(device)
        # Apart from `scores`: a MetricCollection merges metrics whose states are equal after the
        # first update into one compute group, and top-5 counts can equal top-1's on a batch
        # (every top-1 right), after which F1 was computed from top-5's counts.
        self.top_k = (MulticlassAccuracy(num_classes, top_k=TOP_K, average="micro").to(device)
                      if num_classes > TOP_K else None)
        # Cross-entropy whatever the training loss, so runs with different losses compare.
        self.loss = MeanMetric().to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        probs = logits.softmax(dim=1)
        self.scores.update(probs, labels)
        if self.top_k is not None:
            self.top_k.update(probs, labels)
        self.confusion.update(probs, labels)
        self.loss.update(F.cross_entropy(logits, labels, reduction="none"))

    def compute(self) -> tuple[dict[str, float], list[list[int]]]:
        """(scalar metrics, confusion matrix rows=true, cols=predicted); syncs across ranks."""
        self._shape_empty_predictions()
        values = {name: float(v) for name, v in self.scores.compute().items()}
        if self.top_k is not None:  # shown next to top-1
            values = {"val/acc": values.pop("val/acc"), f"val/acc_top{TOP_K}": float(self.top_k.compute()), **values}
        values["val/loss"] = float(self.loss.compute())
        confusion = self.confusion.compute().long().tolist()
        return values, confusion

    def _shape_empty_predictions(self) -> None:
        """Give a rank that validated nothing empty AUROC states of the others' shape and type.

        Left empty, torchmetrics' sync sends a 1-d float placeholder for them, against the (N, C)
        float predictions and int64 labels of the other ranks, and the gather fails (gloo: "Received
        data size doesn't match expected size"). A rank has no validation sample when the set is
        smaller than the process count, or when data.on_error=skip dropped all of its share.
        """
        if "val/auroc_macro" not in self.scores:  # train.auroc=false: counts only
            return
        auroc = self.scores["val/auroc_macro"]
        if not auroc.preds:
            auroc.preds.append(torch.empty(0, auroc.num_classes, device=auroc.device))
            auroc.target.append(torch.empty(0, dtype=torch.long, device=auroc.device))

    def reset(self) -> None:
        self.scores.reset()
        if self.top_k is not None:
            self.top_k.reset()
        self.confusion.reset()
        self.loss.reset()


class MultilabelValidationMetrics:
    """The multi-label counterpart of `ValidationMetrics`; `compute()` returns (scalars, per-label
    detail: {"confusion": [[tn, fp], [fn, tp]] per label, "ap": [...], "auroc": [...]})."""

    detail_key = "val/per_label"

    def __init__(self, num_labels: int, threshold: float = 0.5, device: torch.device | str = "cpu"):
        self.ranked = MetricCollection({
            # thresholds=None: exact; every prediction kept (memory grows with the validation set),
            # once for both: they keep the same states (one compute group, the same on every rank).
            "ap": MultilabelAveragePrecision(num_labels, average=None, thresholds=None),
            "auroc": MultilabelAUROC(num_labels, average=None, thresholds=None),
        }, compute_groups=[["ap", "auroc"]]).to(device)
        self.counted = MetricCollection({
            "val/f1_micro": MultilabelF1Score(num_labels, threshold=threshold, average="micro"),
            "val/f1_macro": MultilabelF1Score(num_labels, threshold=threshold, average="macro"),
            "val/subset_acc": MultilabelExactMatch(num_labels, threshold=threshold),
        }).to(device)
        self.confusion = MultilabelConfusionMatrix(num_labels, threshold=threshold).to(device)
        self.loss = MeanMetric().to(device)  # binary cross-entropy summed over labels, whatever the training loss
        self.num_labels = num_labels

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, targets = logits.float(), labels.long()
        probs = logits.sigmoid()
        self.ranked.update(probs, targets)
        self.counted.update(probs, targets)
        self.confusion.update(probs, targets)
        self.loss.update(F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").sum(1))

    def compute(self) -> tuple[dict[str, float], dict[str, list]]:
        self._shape_empty_predictions()
        ranked = {name: v.double() for name, v in self.ranked.compute().items()}
        values = {
            # Labels without a positive (or negative) in the set have no AP (AUROC): left out.
            "val/map_macro": _nanmean(ranked["ap"]),
            **{name: float(v) for name, v in self.counted.compute().items()},
            "val/auroc_macro": _nanmean(ranked["auroc"]),
            "val/loss": float(self.loss.compute()),
        }
        detail = {"confusion": self.confusion.compute().long().tolist(),
                  "ap": ranked["ap"].tolist(), "auroc": ranked["auroc"].tolist()}
        return values, detail

    def _shape_empty_predictions(self) -> None:
        """A rank that validated nothing: empty prediction states of the others' shape and type
        (see ValidationMetrics._shape_empty_predictions)."""
        for metric in self.ranked.values(copy_state=False):  # no copy of the predictions kept
            if not metric.preds:
                metric.preds.append(torch.empty(0, self.num_labels, device=metric.device))
                metric.target.append(torch.empty(0, self.num_labels, dtype=torch.long, device=metric.device))

    def reset(self) -> None:
        self.ranked.reset()
        self.counted.reset()
        self.confusion.reset()
        self.loss.reset()


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.mean()) if len(finite) else float("nan")


def validation_metrics(cfg: Config, num_classes: int, device: torch.device | str = "cpu"):
    """The metrics of the run's task."""
    if cfg.data.task == "multilabel":
        return MultilabelValidationMetrics(num_classes, cfg.train.threshold, device)
    return ValidationMetrics(num_classes, device, auroc=cfg.train.auroc)
