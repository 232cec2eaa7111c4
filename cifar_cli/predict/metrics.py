"""Classification metrics (torchmetrics): accuracy, macro precision / recall / F1, per class, confusion matrix; and
the calibration of the probabilities (expected calibration error, reliability bins)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def epoch_metrics(num_classes: int, device: torch.device | str = "cpu") -> MetricCollection:
    """Overall metrics, cheap enough to update on every training batch."""
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
    ).to(device)


def count_into(confusion: torch.Tensor, predicted: torch.Tensor, targets: torch.Tensor) -> None:
    """Add a batch to a flat C x C count matrix (rows: true class) on its device: no value is read back to the
    host, so a GPU step never waits (torchmetrics' update checks its arguments with a `unique`, which does)."""
    classes = int(round(confusion.numel() ** 0.5))
    cells = targets * classes + predicted
    confusion.index_add_(0, cells, torch.ones_like(cells, dtype=confusion.dtype))


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1 of a C x C count matrix (rows: true class), as torchmetrics'
    epoch_metrics compute them: 0/0 counts 0, and a class neither true nor predicted anywhere is left out of the
    macro means."""
    classes = int(round(confusion.numel() ** 0.5))
    counts = confusion.reshape(classes, classes).double().cpu()
    true_positives = counts.diagonal()
    predicted, actual = counts.sum(dim=0), counts.sum(dim=1)
    precision = true_positives / predicted.clamp(min=1)
    recall = true_positives / actual.clamp(min=1)
    f1 = 2 * true_positives / (predicted + actual).clamp(min=1)
    present = (predicted + actual) > 0
    present_count = max(int(present.sum()), 1)

    def macro(values: torch.Tensor) -> float:
        return float(values[present].sum() / present_count)

    total = float(counts.sum())
    return {
        "accuracy": float(true_positives.sum()) / max(total, 1.0),
        "precision": macro(precision),
        "recall": macro(recall),
        "f1": macro(f1),
    }


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
    classes = len(class_names)
    overall = {name: float(value) for name, value in epoch_metrics(classes).forward(predictions, targets).items()}
    per_class_metrics = {
        "precision": MulticlassPrecision(classes, average="none")(predictions, targets),
        "recall": MulticlassRecall(classes, average="none")(predictions, targets),
        "f1": MulticlassF1Score(classes, average="none")(predictions, targets),
    }
    confusion = MulticlassConfusionMatrix(classes)(predictions, targets)
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


def most_confused(confusion: list[list[int]], class_names: list[str], count: int = 10) -> list[tuple[str, str, int]]:
    """The `count` largest off-diagonal cells as (true class, predicted class, images), largest first; ties in
    label order. For many classes this says more than the whole matrix."""
    cells = [
        (images, true, guess)
        for true, row in enumerate(confusion)
        for guess, images in enumerate(row)
        if true != guess and images > 0
    ]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [(class_names[true], class_names[guess], images) for images, true, guess in cells[:count]]


ECE_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) and most papers report it


def reliability_bins(
    probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per equal-width bin of confidence (the top probability): its bounds, image count, accuracy and mean
    confidence (accuracy and confidence 0 for an empty bin)."""
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == targets).double()
    index = (confidence.double() * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(index, minlength=bins).double()
    right = torch.bincount(index, weights=correct, minlength=bins)
    sure = torch.bincount(index, weights=confidence.double(), minlength=bins)
    return [
        {
            "lower": b / bins,
            "upper": (b + 1) / bins,
            "count": int(counts[b]),
            "accuracy": float(right[b] / counts[b]) if counts[b] else 0.0,
            "confidence": float(sure[b] / counts[b]) if counts[b] else 0.0,
        }
        for b in range(bins)
    ]


def expected_calibration_error(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over the bins, weighted by the share of images in each (0: perfectly
    calibrated)."""
    rows = reliability_bins(probabilities, targets, bins)
    total = sum(row["count"] for row in rows)
    return sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows) / max(total, 1)


def report_from_predictions(predictions: Any, class_names: list[str]) -> ClassificationReport:
    """The classification report of `predict`'s output (predicted and true classes)."""
    return classification_report(predictions.predicted, predictions.targets, class_names)
