"""The end of a run: the last weights scored once on the test split, and what `train()` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_cli.budget.plan import RunPlan
from cifar_cli.config.settings import Settings
from cifar_cli.data.loader import BatchLoader
from cifar_cli.predict.inference import predict
from cifar_cli.predict.metrics import ClassificationReport, expected_calibration_error, report_from_predictions
from cifar_cli.predict.temperature import temperature_record
from cifar_cli.runtime.device import Precision, describe_device
from cifar_cli.runtime.distributed import DistContext
from cifar_cli.train.setup import Loaders


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    checkpoint_dir: Path
    history: list[dict[str, Any]]
    final_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from_epoch: int = 0
    stopped_early: bool = False
    plan: RunPlan | None = None


def final_evaluation(
    model: nn.Module,
    loader: BatchLoader,
    settings: Settings,
    precision: Precision,
    device: torch.device,
    history: list[dict[str, Any]],
    held_out: BatchLoader | None = None,
) -> tuple[dict[str, Any], ClassificationReport, dict[str, Any] | None]:
    """The last weights on the test split (with TTA where the recipe has it), read once, after training: never used
    to choose anything. With `held_out` (the validation split), a temperature is fitted there first. Returns
    final_metrics.json's numbers (the caller adds the clock), the full report and the temperature record (or None)."""
    level, share = settings.train.tta_level(), settings.train.tta_share
    temperature = None
    if held_out is not None:  # every view, as `predict` and exports score the images they apply it to
        scored = predict(model, held_out, precision, device, level, 1.0)
        temperature = temperature_record(scored.logits, scored.targets, bool(level), "cifar train")
    predictions = predict(model, loader, precision, device, level, share)
    # The calibration errors of the probabilities users get: every view (a second pass where selective TTA scored
    # the accuracy; the plan counts it: train/planning.py).
    selective = bool(level) and share < 1
    as_used = predict(model, loader, precision, device, level, 1.0) if temperature and selective else predictions
    report = report_from_predictions(predictions, list(loader.spec.class_names))
    last_val = {"val_accuracy": history[-1]["val_accuracy"]} if history and "val_accuracy" in history[-1] else {}
    final = {
        "split": "test",
        "accuracy": report.accuracy,
        "f1": report.f1_macro,
        "loss": predictions.loss,
        **last_val,
        "tta_level": level,
        **({"tta_share": share} if level and share < 1 else {}),
        "epochs": len(history),
        "train_seconds": sum(record["seconds"] for record in history),
        **calibration_errors(as_used.logits, as_used.targets, temperature),
    }
    return final, report, temperature


def calibration_errors(logits: torch.Tensor, targets: torch.Tensor, temperature: dict | None) -> dict[str, float]:
    """The test split's expected calibration error (15 bins) of the softmax, and after the temperature if fitted."""
    errors = {"ece": expected_calibration_error(torch.softmax(logits.double(), dim=1), targets)}
    if temperature is not None:
        scaled = torch.softmax(logits.double() / temperature["value"], dim=1)
        errors.update(temperature=temperature["value"], ece_calibrated=expected_calibration_error(scaled, targets))
    return errors


def run_banner(
    run_name: str,
    settings: Settings,
    loaders: Loaders,
    epoch_split: str,
    device: torch.device,
    precision: Precision,
    context: DistContext,
    teacher_cached: bool = False,
) -> str:
    """The line a run starts with: what trains, where, in what precision, on how many images, for how long
    (`teacher_cached`: a distilling run's teacher scored every image once, recipe/distill.py)."""
    train = settings.train
    training, scored = len(loaders.train.labels), len(loaders.evaluation.labels)
    held_out = (
        f"{scored:,} held out for validation"
        if epoch_split == "val"
        else f"none held out (the {scored:,} test images are scored each epoch for the curves only)"
    )
    subset = " (data.train_subset)" if settings.data.train_subset == training else ""
    parts = [
        f"run {run_name}",
        f"model {settings.model.name}" + _width(settings.model.width_multiplier),
        f"device {describe_device(device)}",
        f"precision {precision.name}",
        f"{training:,} training images{subset}, {held_out}",
        f"batch {train.batch_size} x {len(loaders.train)} steps x {train.epochs} epochs",
    ]
    if context.enabled:
        parts.append(f"{context.world_size} processes")
    if train.low_res.size and train.low_res.epochs:
        parts.append(f"the first {train.low_res.epochs} epochs at {train.low_res.size} x {train.low_res.size} pixels")
    if train.ema.enabled:
        parts.append(describe_ema(settings))
    if train.distill.teacher is not None:
        distill = train.distill
        once = ", its logits scored once per image" if teacher_cached else ""
        parts.append(
            f"distilled from {distill.teacher} (alpha {distill.alpha:g}, temperature {distill.temperature:g}{once})"
        )
    return "Training: " + ", ".join(parts)


def describe_final(
    final: dict[str, Any], report: ClassificationReport, checkpoints: Path, logs: Path, temperature: dict | None
) -> str:
    """The run's last words: its test accuracy, where its files are, and the temperature fitted at the end."""
    said = (
        f"Final {'TTA ' if final['tta_level'] else ''}test accuracy {report.accuracy:.2%} "
        f"(macro F1 {report.f1_macro:.3f}); checkpoints in {checkpoints}, logs in {logs}"
    )
    if temperature is not None:
        said += (
            f"\nProbabilities calibrated: temperature {temperature['value']:.3f}, fitted on the "
            f"{temperature['images']:,} held-out images (test calibration error {final['ece']:.2%} -> "
            f"{final['ece_calibrated']:.2%}); predict and export use it."
        )
    return said


def describe_ema(settings: Settings) -> str:
    """What train.ema does in this run, and that it (not lookahead) decides the weights kept where both are on."""
    ema = settings.train.ema
    start = f" from epoch {ema.start_epoch:g}" if ema.start_epoch else ""
    kept = "; lookahead shapes the training, the average is what is scored" if settings.train.lookahead else ""
    return f"weights averaged (EMA, decay {ema.effective_decay():.5g}{start}) and scored{kept}"


def _width(width_multiplier: float) -> str:
    return "" if width_multiplier == 1 else f" (width x{width_multiplier:g})"
