"""How long a run takes on this machine, the longest run that fits a time budget, and the time left while it runs.

All figures are seconds of wall clock, estimated from the measured step speeds (budget/probe.py): a training
step takes `batch / train images/s + optimiser seconds`, a validation pass `images / eval images/s`, and the final
evaluation with test-time augmentation `images x views / eval images/s`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cifar_cli.budget.probe import Calibration
from cifar_cli.config.durations import format_duration
from cifar_cli.errors import UsageError


def count(number: int, noun: str) -> str:
    """`1 epoch`, `7 epochs`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


# Narrower networks tried, in order, when one epoch at the recipe's width does not fit the budget.
WIDTHS = (1.0, 0.75, 0.5, 0.375, 0.25)
# Share of the budget the plan fills; the rest absorbs the estimate's error and the process start (imports, about
# 3 s) that happens before the clock starts.
PLAN_SHARE = 0.92
EPOCH_OVERHEAD_SECONDS = 1.0  # checkpoint, history and TensorBoard writes after each epoch
FINAL_OVERHEAD_SECONDS = 3.0  # confusion-matrix figure, final files
TTA_VIEWS = {0: 1, 1: 2, 2: 6}  # forward passes per image at each test-time augmentation level


def final_views(tta_level: int, tta_share: float) -> float:
    """Forward passes per image of the final evaluation: every view, or with selective TTA a plain pass for all and
    every view for the share least sure (predict/inference.py)."""
    views = TTA_VIEWS[tta_level]
    return views if tta_level == 0 or tta_share >= 1 else 1 + tta_share * views


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
    # Images the final evaluation scores (the test split, plus the validation split where a temperature is fitted on
    # it); 0: the same images as each epoch's evaluation.
    test_images: int = 0
    last_epoch_steps: int = 0  # a budget's last epoch cut to this many steps; 0: a whole epoch
    remaining_seconds: float | None = None  # a re-plan: what the run's own epochs say is left after `elapsed`
    # The rung a budget chose and every rung's estimate (budget/ladder.py); None where no ladder was climbed.
    ladder: dict[str, Any] | None = None
    tta_share: float = 1.0  # selective TTA: the share of the final images scored with every view
    # train.low_res: the first `low_res_epochs` train on images of `low_res_size` pixels a side, a step of which
    # takes `low_res_cost` of a full-size step's seconds (measured: budget/probe.py).
    low_res_epochs: int = 0
    low_res_size: int = 0
    low_res_cost: float = 1.0
    activation: str | None = None  # model.activation the run trains with (a CPU budget's may differ); None: its own

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run: what the learning-rate schedule spans."""
        if self.last_epoch_steps and self.epochs:
            return (self.epochs - 1) * self.steps_per_epoch + self.last_epoch_steps
        return self.epochs * self.steps_per_epoch

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of epoch `epoch` (1-based): the last one may be cut short to fit the budget."""
        return self.last_epoch_steps if epoch == self.epochs and self.last_epoch_steps else self.steps_per_epoch

    def step_cost(self, epoch: int) -> float:
        """A step of epoch `epoch` (1-based) as a share of a full-size step's seconds."""
        return self.low_res_cost if epoch <= self.low_res_epochs else 1.0

    def epoch_seconds_of(self, epoch: int) -> float:
        """Epoch `epoch` (1-based) here: its steps at its images' size, its evaluation and writes."""
        steps = self.steps_in_epoch(epoch) * self.step_cost(epoch)
        return steps * self.calibration.step_seconds(self.batch_size) + self.val_seconds + EPOCH_OVERHEAD_SECONDS

    @property
    def train_seconds_per_epoch(self) -> float:
        return self.steps_per_epoch * self.calibration.step_seconds(self.batch_size)

    @property
    def val_seconds(self) -> float:
        return self.val_images / self.calibration.eval_speed

    @property
    def epoch_seconds(self) -> float:
        return self.train_seconds_per_epoch + self.val_seconds + EPOCH_OVERHEAD_SECONDS

    @property
    def final_seconds(self) -> float:
        return self.final_seconds_at(self.calibration.eval_speed)

    def final_seconds_at(self, eval_images_per_second: float) -> float:
        """The final evaluation (every test-time augmentation view) at this evaluation speed, in seconds."""
        images = self.test_images or self.val_images
        return images * final_views(self.tta_level, self.tta_share) / eval_images_per_second + FINAL_OVERHEAD_SECONDS

    @property
    def total_seconds(self) -> float:
        if self.remaining_seconds is not None:
            return self.elapsed_seconds + self.remaining_seconds
        epochs = sum(self.epoch_seconds_of(epoch) for epoch in range(1, self.epochs + 1))
        return self.elapsed_seconds + epochs + self.final_seconds

    def _cut(self) -> str:
        small, steps = min(self.low_res_epochs, self.epochs), self.last_epoch_steps
        parts = [f"the first {small} at {self.low_res_size} x {self.low_res_size} px"] if small else []
        parts += [f"the last cut to {count(steps, 'step')}"] if steps else []
        return f" ({', '.join(parts)})" if parts else ""

    def describe(self) -> str:
        budget = f" (budget {format_duration(self.budget_seconds)})" if self.budget_seconds else ""
        return (
            f"Plan: {count(self.epochs, 'epoch')} x {self.steps_per_epoch} steps of {self.batch_size}{self._cut()}, width x"
            f"{self.width_multiplier:g}{f', {self.activation}' if self.activation else ''}, "
            f"{self.calibration.layout.label}: about "
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
            "eval_images_per_second": self.calibration.eval_speed,
            "learned_epochs": self.calibration.learned_epochs,
            "optimizer_seconds": self.calibration.optimizer_seconds,
            "estimated_epoch_seconds": self.epoch_seconds,
            "estimated_total_seconds": self.total_seconds,
            "budget_seconds": self.budget_seconds,
            "last_epoch_steps": self.last_epoch_steps or self.steps_per_epoch,
            "total_steps": self.total_steps,
            **({"low_res": self._low_res_json()} if self.low_res_epochs else {}),
            **({"activation": self.activation} if self.activation else {}),
            **({"ladder": self.ladder} if self.ladder else {}),
        }

    def _low_res_json(self) -> dict[str, Any]:
        return {"epochs": self.low_res_epochs, "size": self.low_res_size, "step_cost": self.low_res_cost}


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
    tta_share: float = 1.0,
    low_res: tuple[int, int] = (0, 0),
    time_small: Callable[[Calibration, float], Calibration] | None = None,
    wider: tuple[float, int] | None = None,
    narrower: bool = True,
) -> RunPlan:
    """As many epochs as fit at the recipe's width, the first `low_res` = (epochs, side) on smaller images; where
    not even one full-size epoch fits after them, fewer of them, then the widest narrower network that fits one.
    `wider` = (width, epochs): first the plan at that wider width, kept where it trains at least that many epochs
    (a narrower recipe width pays only where the wider one trains too few). `narrower=False`: the recipe's width
    only (weights loaded from elsewhere, a published architecture).
    `calibrate_at(width)` measures (or recalls) the speeds at a width, `time_small(calibration, width)` the small
    images' step share (only at a width where a full-size epoch fits: a short budget pays for no probe it cannot
    use); `elapsed_seconds()` is the time the run has spent so far, measurements included."""

    def fitted_at(width: float) -> tuple[RunPlan, RunPlan | None]:
        """The plan at `width` with one epoch, and the one that fills the budget (None: not one full-size epoch)."""
        calibration = calibrate_at(width)
        elapsed = elapsed_seconds()
        plan = RunPlan(
            1,
            width,
            batch_size,
            steps_per_epoch,
            val_images,
            tta_level,
            calibration,
            budget_seconds,
            elapsed,
            test_images,
            tta_share=tta_share,
            low_res_size=low_res[1],
        )
        full_size = _fill(plan, budget_seconds * PLAN_SHARE - elapsed - plan.final_seconds)
        if full_size is not None and low_res[0] and time_small is not None:
            small = time_small(calibration, width)
            return plan, _with_small_epochs(plan, full_size, small, elapsed_seconds(), low_res[0])
        return plan, full_size

    if wider is not None:
        _, fitted = fitted_at(wider[0])
        if fitted is not None and fitted.epochs >= wider[1]:
            return fitted
    plan = None
    for width in [recipe_width] + [width for width in WIDTHS if width < recipe_width and narrower]:
        plan, fitted = fitted_at(width)
        if fitted is not None:
            return fitted
    assert plan is not None
    raise UsageError(
        f"A time budget of {format_duration(budget_seconds)} is too short: one epoch at the narrowest width "
        f"(x{plan.width_multiplier:g}) needs about {format_duration(plan.total_seconds)} on this machine.",
        hint="Give a longer --time-budget, or a smaller --batch-size / data set.",
    )


def _with_small_epochs(plan: RunPlan, full_size: RunPlan, timed: Calibration, elapsed: float, most: int) -> RunPlan:
    """The most small epochs (up to `most`) that still leave a full-size epoch, at the step share `timed` measured;
    `full_size` (no small epochs) where none does."""
    priced = replace(
        plan, calibration=timed, elapsed_seconds=elapsed, low_res_cost=timed.low_res_share(plan.low_res_size)
    )
    spare = plan.budget_seconds * PLAN_SHARE - elapsed - priced.final_seconds if plan.budget_seconds else 0.0
    for small_epochs in range(most, 0, -1):
        fitted = _fill(replace(priced, low_res_epochs=small_epochs), spare)
        if fitted is not None:
            return fitted
    return _fill(priced, spare) or full_size


def _fill(plan: RunPlan, spare_seconds: float) -> RunPlan | None:
    """The most steps of `plan`'s width that fit `spare_seconds` after its low-resolution epochs, each epoch paying
    its evaluation and writes: whole epochs and a last one cut short where that still trains more (fit_steps, as
    every re-plan). None where not even one whole full-size epoch fits (fewer small epochs or a narrower network is
    tried instead)."""
    per_epoch = plan.val_seconds + EPOCH_OVERHEAD_SECONDS
    pace = plan.calibration.step_seconds(plan.batch_size)
    small, steps = plan.low_res_epochs, plan.steps_per_epoch
    early = small * (steps * pace * plan.low_res_cost + per_epoch)
    # Planned as if the small epochs (or an epoch 0) had just ended: fit_steps charges the epoch in progress its
    # evaluation.
    fitted = fit_steps(plan, spare_seconds - early + per_epoch, small, steps, pace, per_epoch)
    if fitted is None or fitted.total_steps - small * steps < steps:
        return None
    return fitted


class RemainingTime:
    """Seconds left in a run: the plan's estimate until the run has measured better (its own batches and epochs)."""

    def __init__(self, plan: RunPlan, epochs_done: int) -> None:
        self.plan = plan
        self.epochs_done = epochs_done
        self.measured_epochs: list[tuple[int, float]] = []  # (epoch, wall seconds) of this process's epochs
        self.epoch_started = time.perf_counter()

    def start_epoch(self) -> None:
        self.epoch_started = time.perf_counter()

    def _later(self, after_epoch: int) -> float:
        """The epochs after `after_epoch` here: the plan's estimate of each (epochs on smaller images cost less),
        scaled by how this process's own epochs compared with the plan's estimate of them."""
        planned = sum(self.plan.epoch_seconds_of(epoch) for epoch in range(after_epoch + 1, self.plan.epochs + 1))
        if not self.measured_epochs:
            return planned
        measured = sum(seconds for _, seconds in self.measured_epochs)
        return planned * measured / sum(self.plan.epoch_seconds_of(epoch) for epoch, _ in self.measured_epochs)

    def during_epoch(self, batches_done: int) -> float:
        epoch = self.epochs_done + 1
        if batches_done:
            per_batch = (time.perf_counter() - self.epoch_started) / batches_done
        else:
            per_batch = self.plan.calibration.step_seconds(self.plan.batch_size) * self.plan.step_cost(epoch)
        this_epoch = max(self.plan.steps_in_epoch(epoch) - batches_done, 0) * per_batch + self.plan.val_seconds
        return this_epoch + self._later(epoch) + self.plan.final_seconds

    def end_epoch(self) -> float:
        self.epochs_done += 1
        self.measured_epochs.append((self.epochs_done, time.perf_counter() - self.epoch_started))
        return self._later(self.epochs_done) + self.plan.final_seconds


def fit_steps(
    plan: RunPlan, available_seconds: float, epochs_begun: int, steps_into_epoch: int, pace: float, per_eval: float
) -> RunPlan | None:
    """During epoch `epochs_begun`, `steps_into_epoch` steps in: the most further steps that fit
    `available_seconds` at `pace` seconds a step, each epoch end costing `per_eval`; the plan that trains them
    (its epochs and its last epoch's steps), or None where not even the epoch in progress can go on."""
    per_epoch, left_in_epoch = plan.steps_per_epoch, plan.steps_per_epoch - steps_into_epoch

    def further_steps(extra_epochs: int) -> int:
        room = available_seconds - (1 + extra_epochs) * per_eval
        return min(math.floor(room / pace), left_in_epoch + extra_epochs * per_epoch)

    def fits(extra_epochs: int) -> bool:  # true up to some count, false after: each epoch adds an evaluation
        if extra_epochs == 0:
            return further_steps(0) >= 0
        return further_steps(extra_epochs) > left_in_epoch + (extra_epochs - 1) * per_epoch  # a step for it

    if not fits(0):
        return None
    # Closed form of the last count that fits, then checked against `fits` (floating point may be one off).
    estimate = (available_seconds - per_eval - pace * (left_in_epoch - per_epoch + 1)) / (per_eval + pace * per_epoch)
    extra_epochs = max(0, math.floor(estimate))
    while extra_epochs > 0 and not fits(extra_epochs):
        extra_epochs -= 1
    while fits(extra_epochs + 1):
        extra_epochs += 1
    steps = further_steps(extra_epochs)
    last = steps_into_epoch + steps - extra_epochs * plan.steps_per_epoch
    last = 0 if last >= plan.steps_per_epoch else last
    return RunPlan(**{**plan.__dict__, "epochs": epochs_begun + extra_epochs, "last_epoch_steps": last})
