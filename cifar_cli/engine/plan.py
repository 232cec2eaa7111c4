"""How long a run takes on this machine, the longest run that fits a time budget, and the time left while it runs.

All figures are seconds of wall clock, estimated from the measured step speeds (engine/calibrate.py): a training
step takes `batch / train images/s + optimiser seconds`, a validation pass `images / eval images/s`, and the final
evaluation with test-time augmentation `images x views / eval images/s`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cifar_cli.durations import format_duration
from cifar_cli.engine.calibrate import Calibration
from cifar_cli.errors import UsageError

# Narrower networks tried, in order, when one epoch at the recipe's width does not fit the budget.
WIDTHS = (1.0, 0.75, 0.5, 0.375, 0.25)
# Share of the budget the plan fills; the rest absorbs the estimate's error and the process start (imports, about
# 3 s) that happens before the clock starts.
PLAN_SHARE = 0.92
EPOCH_OVERHEAD_SECONDS = 1.0  # checkpoint, history and TensorBoard writes after each epoch
FINAL_OVERHEAD_SECONDS = 3.0  # confusion-matrix figure, final files
TTA_VIEWS = {0: 1, 1: 2, 2: 6}  # forward passes per image at each test-time augmentation level


@dataclass(frozen=True)
class RunPlan:
    epochs: int
    width_multiplier: float
    batch_size: int
    steps_per_epoch: int
    val_images: int
    tta_level: int
    calibration: Calibration
    budget_seconds: float | None = None
    elapsed_seconds: float = 0.0  # spent before training starts (data, calibration)
    test_images: int = 0  # the final evaluation's split; 0: the same images as each epoch's evaluation

    @property
    def train_seconds_per_epoch(self) -> float:
        return self.steps_per_epoch * self.calibration.step_seconds(self.batch_size)

    @property
    def val_seconds(self) -> float:
        return self.val_images / self.calibration.eval_images_per_second

    @property
    def epoch_seconds(self) -> float:
        return self.train_seconds_per_epoch + self.val_seconds + EPOCH_OVERHEAD_SECONDS

    @property
    def final_seconds(self) -> float:
        views = TTA_VIEWS[self.tta_level]
        images = self.test_images or self.val_images
        return images * views / self.calibration.eval_images_per_second + FINAL_OVERHEAD_SECONDS

    @property
    def total_seconds(self) -> float:
        return self.elapsed_seconds + self.epochs * self.epoch_seconds + self.final_seconds

    def describe(self) -> str:
        budget = f" (budget {format_duration(self.budget_seconds)})" if self.budget_seconds else ""
        return (
            f"Plan: {self.epochs} epochs x {self.steps_per_epoch} steps of {self.batch_size}, width x"
            f"{self.width_multiplier:g}, {self.calibration.layout.label}: about "
            f"{format_duration(self.epoch_seconds)} per epoch, "
            f"{format_duration(self.total_seconds)} in all on this machine{budget}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "width_multiplier": self.width_multiplier,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "precision": self.calibration.precision,
            "channels_last": self.calibration.channels_last,
            "train_images_per_second": self.calibration.train_images_per_second,
            "eval_images_per_second": self.calibration.eval_images_per_second,
            "optimizer_seconds": self.calibration.optimizer_seconds,
            "estimated_epoch_seconds": self.epoch_seconds,
            "estimated_total_seconds": self.total_seconds,
            "budget_seconds": self.budget_seconds,
        }


def fit_budget(
    budget_seconds: float,
    elapsed_seconds: Callable[[], float],
    calibrate_at: Callable[[float], Calibration],
    recipe_width: float,
    steps_per_epoch: int,
    batch_size: int,
    val_images: int,
    tta_level: int,
    test_images: int = 0,
) -> RunPlan:
    """As many epochs as fit at the recipe's width; where not even one does, the widest narrower network that
    fits one. `calibrate_at(width)` measures (or recalls) the speeds at a width; `elapsed_seconds()` is the time
    the run has spent so far, measurements included."""
    widths = [recipe_width] + [width for width in WIDTHS if width < recipe_width]
    plan = None
    for width in widths:
        calibration = calibrate_at(width)
        elapsed = elapsed_seconds()
        plan = RunPlan(
            1, width, batch_size, steps_per_epoch, val_images, tta_level, calibration, budget_seconds, elapsed,
            test_images,
        )  # fmt: skip
        spare = budget_seconds * PLAN_SHARE - elapsed - plan.final_seconds
        epochs = math.floor(spare / plan.epoch_seconds)
        if epochs >= 1:
            return RunPlan(**{**plan.__dict__, "epochs": epochs})
    assert plan is not None
    raise UsageError(
        f"A time budget of {format_duration(budget_seconds)} is too short: one epoch at the narrowest width "
        f"(x{plan.width_multiplier:g}) needs about {format_duration(plan.total_seconds)} on this machine.",
        hint="Give a longer --time-budget, or a smaller --batch-size / data set.",
    )


class RemainingTime:
    """Seconds left in a run: the plan's estimate until the run has measured better (its own batches and epochs)."""

    def __init__(self, plan: RunPlan, epochs_done: int) -> None:
        self.plan = plan
        self.epochs_done = epochs_done
        self.measured_epochs: list[
            float
        ] = []  # wall seconds of each epoch of this process, validation included
        self.epoch_started = time.perf_counter()

    def start_epoch(self) -> None:
        self.epoch_started = time.perf_counter()

    def _per_epoch(self) -> float:
        if self.measured_epochs:
            return sum(self.measured_epochs) / len(self.measured_epochs)
        return self.plan.epoch_seconds

    def during_epoch(self, batches_done: int) -> float:
        steps = self.plan.steps_per_epoch
        per_batch = (
            (time.perf_counter() - self.epoch_started) / batches_done
            if batches_done
            else self.plan.train_seconds_per_epoch / steps
        )
        this_epoch = (steps - batches_done) * per_batch + self.plan.val_seconds
        later_epochs = self.plan.epochs - self.epochs_done - 1
        return this_epoch + later_epochs * self._per_epoch() + self.plan.final_seconds

    def end_epoch(self) -> float:
        self.measured_epochs.append(time.perf_counter() - self.epoch_started)
        self.epochs_done += 1
        return (self.plan.epochs - self.epochs_done) * self._per_epoch() + self.plan.final_seconds
