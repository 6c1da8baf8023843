"""Validation metrics from torchmetrics, exact across processes.

Accuracy, macro F1 / precision / recall and the confusion matrix keep summed counts; AUROC
(thresholds=None) keeps every prediction; the loss keeps a sum and a count. Each is synced
across ranks inside `compute()`, which every rank must call. Because each validation sample
is seen by exactly one rank (see data/plan.py), the synced values equal the single-process
values on the whole validation set.
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
)


class ValidationMetrics:
    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.scores = MetricCollection(
            {
                "val/acc": MulticlassAccuracy(num_classes, average="micro"),
                "val/f1_macro": MulticlassF1Score(num_classes, average="macro"),
                "val/precision_macro": MulticlassPrecision(num_classes, average="macro"),
                "val/recall_macro": MulticlassRecall(num_classes, average="macro"),
                # thresholds=None: exact AUROC; memory grows with the validation set.
                "val/auroc_macro": MulticlassAUROC(num_classes, average="macro", thresholds=None),
            },
        ).to(device)
        self.confusion = MulticlassConfusionMatrix(num_classes).to(device)
        # Cross-entropy whatever the training loss, so runs with different losses compare.
        self.loss = MeanMetric().to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        probs = logits.softmax(dim=1)
        self.scores.update(probs, labels)
        self.confusion.update(probs, labels)
        self.loss.update(F.cross_entropy(logits, labels, reduction="none"))

    def compute(self) -> tuple[dict[str, float], list[list[int]]]:
        """(scalar metrics, confusion matrix rows=true, cols=predicted); syncs across ranks."""
        self._shape_empty_predictions()
        values = {name: float(v) for name, v in self.scores.compute().items()}
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
        auroc = self.scores["val/auroc_macro"]
        if not auroc.preds:
            auroc.preds.append(torch.empty(0, auroc.num_classes, device=auroc.device))
            auroc.target.append(torch.empty(0, dtype=torch.long, device=auroc.device))

    def reset(self) -> None:
        self.scores.reset()
        self.confusion.reset()
        self.loss.reset()
