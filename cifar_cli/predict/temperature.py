"""Probabilities that mean what they say: the expected calibration error, and temperature scaling (Guo et al.,
2017) fitted on a run's validation split, never on the test split.

A model trained with label smoothing and scored with test-time augmentation is usually under-confident (its
probabilities are lower than its accuracy); a single temperature T, with softmax(logits / T), fixes most of it
without changing any prediction (the largest logit stays the largest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cifar_cli.checkpoint import load_checkpoint, save_checkpoint
from cifar_cli.config.sections import DataSettings
from cifar_cli.errors import UsageError
from cifar_cli.files import run_lock
from cifar_cli.predict.evaluate import run_evaluation
from cifar_cli.predict.exported_model import EXPORTED_SUFFIXES
from cifar_cli.predict.metrics import expected_calibration_error

TEMPERATURE_RANGE = (0.05, 20.0)
FEW_IMAGES = 1_000  # validation images below which a fitted temperature is noisy
LOCK_HINT = "Calibrate once the training has finished: its next checkpoint would be written over the temperature."


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of `targets` (L-BFGS over log T, in float64)."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    scores = logits.detach().double()
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores / log_t.exp(), targets)
        loss.backward()
        return loss

    optimiser.step(closure)
    low, high = TEMPERATURE_RANGE
    return float(min(max(math.exp(float(log_t.detach())), low), high))


def temperature_record(logits: torch.Tensor, targets: torch.Tensor, tta: bool, fitted_by: str) -> dict[str, Any]:
    """The temperature fitted to held-out logits, as a checkpoint stores it (`cifar calibrate` or the run's end)."""
    temperature = fit_temperature(logits, targets)
    return {
        "value": temperature,
        "fitted_on": "val",
        "images": len(targets),
        "tta": tta,
        "val_nll": [nll(logits, targets), nll(logits, targets, temperature)],
        "fitted_by": fitted_by,
    }


def calibrate_checkpoint(
    checkpoint: Path, data: DataSettings, device_name: str = "auto", say: Callable[[str], None] = lambda _t: None
) -> dict[str, Any]:
    """Fit the temperature of `checkpoint` on its run's validation split and store it in the file (rewritten
    atomically); returns the temperature with the test split's ECE and NLL before and after."""
    if checkpoint.suffix in EXPORTED_SUFFIXES:
        raise UsageError(
            f"{checkpoint} is an export: calibrate the checkpoint, then export it again (the temperature goes into "
            "the export's contract)."
        )
    # The run's own lock: a training still running would write its next epoch over the temperature.
    with run_lock([checkpoint.parent], checkpoint.parent.name, hint=LOCK_HINT):
        return _calibrate(checkpoint, data, device_name, say)


def _calibrate(checkpoint: Path, data: DataSettings, device_name: str, say: Callable[[str], None]) -> dict[str, Any]:
    stored = load_checkpoint(checkpoint)
    val_size = stored["settings"]["data"].get("val_size")
    if not val_size:
        raise UsageError(
            f"{checkpoint} comes from a run that held out no validation split: a temperature fitted on the test "
            "split would make its test figures optimistic.",
            hint="Train with --val-size 5000 (data.val_size): the temperature is fitted on those images.",
        )
    say(f"Fitting the temperature on the validation split ({val_size:,} images held out of training).")
    if val_size < FEW_IMAGES:
        say(
            f"Only {val_size:,} validation images: the temperature is a rough estimate (a thousand or more pin it down)."
        )
    val = run_evaluation(checkpoint, data, "val", device_name=device_name, say=say)
    record = temperature_record(val.logits, val.targets, val.metrics["tta"], "cifar calibrate")
    temperature = record["value"]
    test = run_evaluation(checkpoint, data, "test", device_name=device_name, say=say)
    stored["temperature"] = record
    save_checkpoint(stored, checkpoint)
    probabilities = torch.softmax(test.logits.double(), dim=1)
    scaled = torch.softmax(test.logits.double() / temperature, dim=1)
    return {
        "checkpoint": str(checkpoint),
        "temperature": temperature,
        "validation_images": len(val.targets),
        "test_images": len(test.targets),
        "test_accuracy": test.metrics["accuracy"],
        "test_ece_before": expected_calibration_error(probabilities, test.targets),
        "test_ece_after": expected_calibration_error(scaled, test.targets),
        "test_nll_before": nll(test.logits, test.targets),
        "test_nll_after": nll(test.logits, test.targets, temperature),
        "val_nll_before": record["val_nll"][0],
        "val_nll_after": record["val_nll"][1],
    }
