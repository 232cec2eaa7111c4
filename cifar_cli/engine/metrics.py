"""Classification metrics (torchmetrics): accuracy, macro precision / recall / F1, per class, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

NUM_CLASSES = 10


def epoch_metrics(device: torch.device | str = "cpu") -> MetricCollection:
    """Overall metrics, cheap enough to update on every training batch."""
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(NUM_CLASSES, average="micro"),
            "precision": MulticlassPrecision(NUM_CLASSES, average="macro"),
            "recall": MulticlassRecall(NUM_CLASSES, average="macro"),
            "f1": MulticlassF1Score(NUM_CLASSES, average="macro"),
        }
    ).to(device)


@dataclass(frozen=True)
class ClassificationReport:
    """Fractions in [0, 1]; `per_class[name]` holds precision, recall, f1 and support."""

    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    num_samples: int


def classification_report(
    predictions: torch.Tensor, targets: torch.Tensor, class_names: list[str]
) -> ClassificationReport:
    predictions, targets = predictions.cpu(), targets.cpu()
    overall = {name: float(value) for name, value in epoch_metrics().forward(predictions, targets).items()}
    per_class_metrics = {
        "precision": MulticlassPrecision(NUM_CLASSES, average="none")(predictions, targets),
        "recall": MulticlassRecall(NUM_CLASSES, average="none")(predictions, targets),
        "f1": MulticlassF1Score(NUM_CLASSES, average="none")(predictions, targets),
    }
    confusion = MulticlassConfusionMatrix(NUM_CLASSES)(predictions, targets)
    support = confusion.sum(dim=1)
    per_class = {
        name: {
            **{key: float(values[index]) for key, values in per_class_metrics.items()},
            "support": int(support[index]),
        }
        for index, name in enumerate(class_names)
    }
    return ClassificationReport(
        accuracy=overall["accuracy"],
        precision_macro=overall["precision"],
        recall_macro=overall["recall"],
        f1_macro=overall["f1"],
        per_class=per_class,
        confusion_matrix=confusion.tolist(),
        num_samples=int(len(targets)),
    )
