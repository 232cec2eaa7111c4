"""Evaluation of saved checkpoints and exported models on a split, and predictions for image files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_cli.config.sections import DataSettings
from cifar_cli.data import ensure_prepared
from cifar_cli.data.loader import BatchLoader, stratified_split
from cifar_cli.data.prepare import load_cache
from cifar_cli.errors import UsageError
from cifar_cli.predict.classify import stored_temperature
from cifar_cli.predict.exported_model import EXPORTED_SUFFIXES, fixed_batch, load_exported, run_batches
from cifar_cli.predict.inference import Predictions, check_same_classes, load_model, predict
from cifar_cli.predict.metrics import ClassificationReport, expected_calibration_error, report_from_predictions
from cifar_cli.runtime.device import resolve_device, resolve_precision
from cifar_cli.runtime.memory import keep_freed_memory


def report_to_json(report: ClassificationReport, **extra: Any) -> dict[str, Any]:
    return {
        "accuracy": report.accuracy,
        "precision_macro": report.precision_macro,
        "recall_macro": report.recall_macro,
        "f1_macro": report.f1_macro,
        "per_class": report.per_class,
        "confusion_matrix": report.confusion_matrix,
        "num_samples": report.num_samples,
        **extra,
    }


def split_tensors(data: DataSettings, split: str, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of `split`; `val` is the part of train that the run held out, `train` the rest."""
    if split == "val" and not val_size:
        raise UsageError(
            "This run held out no validation split (data.val_size 0): there is no val split to evaluate.",
            hint="Use --split test (or train).",
        )
    cache = load_cache(data.processed_dir)
    if split == "test":
        return cache["test_images"], cache["test_labels"]
    images, labels = cache["train_images"], cache["train_labels"]
    if split == "train" and val_size == 0:
        return images, labels
    train_index, val_index = stratified_split(labels, val_size, seed)
    index = val_index if split == "val" else train_index
    return images[index], labels[index]


@dataclass(frozen=True)
class Evaluation:
    """One inference pass over a split: the metrics (`cifar evaluate --json`) and the per-image predictions that
    made them, so every figure and table of a checkpoint agrees with every other."""

    metrics: dict[str, Any]
    images: torch.Tensor  # uint8 N x 3 x 32 x 32, on the CPU
    targets: torch.Tensor  # int64 N
    predicted: torch.Tensor  # int64 N
    logits: torch.Tensor  # float32 N x classes (the TTA the metrics name), not divided by any temperature
    temperature: float  # the checkpoint's (`cifar calibrate`), 1 where it has none

    @property
    def probabilities(self) -> torch.Tensor:
        """Calibrated by the stored temperature."""
        return torch.softmax(self.logits / self.temperature, dim=1)


def calibration_metrics(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, Any]:
    """The expected calibration error of the softmax probabilities, and after the stored temperature (if any)."""
    ece = expected_calibration_error(torch.softmax(logits.double(), dim=1), targets)
    if temperature == 1.0:
        return {"ece": ece, "temperature": None}
    scaled = expected_calibration_error(torch.softmax(logits.double() / temperature, dim=1), targets)
    return {"ece": ece, "temperature": temperature, "ece_calibrated": scaled}


def run_evaluation(
    checkpoint: Path,
    data: DataSettings,
    split: str = "test",
    tta: bool | None = None,
    device_name: str = "auto",
    batch_size: int = 1000,
    say: Callable[[str], None] = lambda _text: None,
    keep_memory: bool = True,
    tta_share: float | None = None,
) -> Evaluation:
    """The checkpoint's predictions on a split, in its own precision and layout, with TTA as it was trained (or as
    `tta` and `tta_share` say). `keep_memory`: on the CPU, malloc keeps freed memory for the next batch (runtime/memory.py).
    An exported model (.onnx, .pt2) is run by its own runtime instead (`export/writer.py`)."""
    if checkpoint.suffix in EXPORTED_SUFFIXES:
        return _evaluate_exported(checkpoint, data, split, tta, say, tta_share)
    device = resolve_device(device_name)
    if keep_memory:
        keep_freed_memory(device.type)
    loaded = load_model(checkpoint, device)
    ensure_prepared(data, say)
    check_same_classes(loaded.spec.class_names, loaded.spec.image_size, data, checkpoint)
    images, labels = split_tensors(data, split, loaded.data_settings.val_size, loaded.train_settings.seed)
    precision = resolve_precision(loaded.train_settings.precision, device)
    loader = BatchLoader(
        images.to(device),
        labels.to(device),
        batch_size,
        train=False,
        spec=loaded.spec,
        dtype=precision.autocast_dtype or torch.float32,
        channels_last=loaded.train_settings.channels_last,
    )
    level = loaded.train_settings.tta_level(tta)
    share = loaded.train_settings.tta_share if tta_share is None else tta_share
    predictions = predict(loaded.model, loader, precision, device, level, share)
    class_names = list(loaded.spec.class_names)
    report = report_from_predictions(predictions, class_names)
    metrics = report_to_json(
        report,
        checkpoint=str(checkpoint),
        split=split,
        tta=bool(level),
        tta_share=share if level else 0.0,
        loss=predictions.loss,
        model=loaded.state["model_name"],
        epoch=loaded.state["epoch"],
        class_names=class_names,
        **calibration_metrics(predictions.logits, predictions.targets, temperature := stored_temperature(loaded.state)),
    )
    return Evaluation(metrics, images, predictions.targets, predictions.predicted, predictions.logits, temperature)


def _evaluate_exported(
    path: Path, data: DataSettings, split: str, tta: bool | None, say: Callable[[str], None], tta_share: float | None
) -> Evaluation:
    exported = load_exported(path)
    contract = exported.contract
    _check_tta(tta, contract, tta_share)
    ensure_prepared(data, say)
    check_same_classes(contract["class_names"], int(contract["input"]["shape"][-1]), data, path)
    images, labels = split_tensors(data, split, contract["val_size"], contract["seed"])
    logits = run_batches(exported.run, images.float() / 255, fixed_batch(contract))
    predictions = Predictions(logits, labels, float(nn.functional.cross_entropy(logits, labels)))
    report = report_from_predictions(predictions, contract["class_names"])
    metrics = report_to_json(
        report,
        checkpoint=str(path),
        split=split,
        tta=bool(contract["tta_level"]),
        tta_share=1.0 if contract["tta_level"] else 0.0,  # the graph scores every image with every view
        loss=predictions.loss,
        model=contract["model"],
        epoch=contract["epoch"],
        class_names=contract["class_names"],
        **calibration_metrics(logits, labels, temperature := stored_temperature(contract)),
    )
    return Evaluation(metrics, images, labels, predictions.predicted, logits, temperature)


def _check_tta(tta: bool | None, contract: dict[str, Any], tta_share: float | None = None) -> None:
    if tta is not None and tta != bool(contract["tta_level"]):
        raise UsageError(
            f"Test-time augmentation is fixed inside this exported model (level {contract['tta_level']}).",
            hint="Drop --tta/--no-tta, or export again with the one you want.",
        )
    if tta_share is not None and tta_share < 1:
        raise UsageError(
            f"--tta-share {tta_share:g} cannot apply to an exported model: its graph scores every image with "
            + ("every view." if contract["tta_level"] else "one view (it was exported without TTA)."),
            hint="Drop --tta-share, or evaluate the checkpoint (.pth) instead.",
        )
