"""Re-plans from a run's own epochs: the epochs left refit to what the latest epochs measured (budget/keeper.py
calls it after every epoch). Epochs of different cost (train.low_res: the first epochs on smaller images) are
measured apart: the full-size pace from full-size epochs once there are some, the low-resolution epochs left from
the low-resolution ones, each from the other scaled by the plan's measured step share until it has its own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cifar_cli.budget.plan import RunPlan, count, fit_steps
from cifar_cli.config.durations import format_duration

# Where a re-planned run aims to end, as a share of its budget: inside 90-100% with room for the estimate's error.
REPLAN_TARGET_SHARE = 0.96
RECENT_EPOCHS = 3  # the epochs a re-plan weighs, the newest double the one before (a shared machine drifts)


@dataclass(frozen=True)
class EpochTiming:
    """What one finished epoch measured, in seconds of wall clock."""

    steps: int
    train_seconds: float  # the optimiser steps
    eval_seconds: float  # the per-epoch evaluation pass
    total_seconds: float  # the whole epoch: steps, evaluation, checkpoint and logs
    cost: float = 1.0  # the plan's share of a full-size step a step of this epoch takes (RunPlan.step_cost)

    @property
    def step_seconds(self) -> float:
        return self.train_seconds / max(self.steps, 1)

    @property
    def full_size_step_seconds(self) -> float:
        """This epoch's pace as a full-size step: scaled by its planned share where its images were smaller."""
        return self.step_seconds / self.cost


@dataclass(frozen=True)
class Replan:
    plan: RunPlan
    step_seconds: float  # measured: what the new plan assumes per full-size step
    images_per_second: float
    during_epoch: int | None = None  # refit inside this epoch (its own pace), not after one

    def describe(self, before: RunPlan) -> str:
        def length(plan: RunPlan) -> str:
            return count(plan.epochs, "epoch") + plan._cut()

        when = f" during epoch {self.during_epoch}" if self.during_epoch is not None else ""
        return (
            f"Re-planned{when}: {length(self.plan)} instead of {length(before)}, this machine runs at "
            f"{self.images_per_second:,.0f} img/s now; about {format_duration(self.plan.total_seconds)} in all "
            f"(budget {format_duration(self.plan.budget_seconds or 0)})"
        )


def recent(timings: list[EpochTiming], value: Callable[[EpochTiming], float]) -> float:
    """`value` over the last RECENT_EPOCHS timings, the newest weighing double the one before."""
    chosen = timings[-RECENT_EPOCHS:]
    weights = [2.0**index for index in range(len(chosen))]
    return sum(w * value(t) for w, t in zip(weights, chosen)) / sum(weights)


def replan(
    plan: RunPlan, elapsed_seconds: float, epochs_done: int, timings: list[EpochTiming], eval_images: int
) -> Replan:
    """The epochs left refit to what this run's own epochs measured, so that the run, final evaluation included,
    ends near REPLAN_TARGET_SHARE of its budget. The low-resolution epochs still to come are kept (the loader
    trains them); full-size epochs fill the rest, the last one cut short (to as few as one step) rather than leave
    part of the budget unused."""
    assert plan.budget_seconds is not None and timings
    full_size = [t for t in timings if t.cost == 1.0]
    step = recent(full_size or timings, lambda t: t.full_size_step_seconds)
    small = [t for t in timings if t.cost != 1.0]
    small_step = recent(small, lambda t: t.step_seconds) if small else step * plan.low_res_cost
    per_eval = recent(timings, lambda t: t.total_seconds - t.train_seconds)
    eval_rate = recent(timings, lambda t: eval_images / max(t.eval_seconds, 1e-6))
    final = plan.final_seconds_at(eval_rate)
    available = plan.budget_seconds * REPLAN_TARGET_SHARE - elapsed_seconds - final
    small_left = max(0, plan.low_res_epochs - epochs_done)
    early = small_left * (plan.steps_per_epoch * small_step + per_eval)
    begun = epochs_done + small_left  # as if the low-resolution epochs left had just ended
    # The epoch just ended is evaluated already: fit_steps charges an evaluation for the epoch in progress.
    fit = fit_steps(plan, available - early + per_eval, begun, plan.steps_per_epoch, step, per_eval)
    epochs, last_steps = (fit.epochs, fit.last_epoch_steps) if fit is not None else (begun, 0)
    whole_epoch = plan.steps_per_epoch * step + per_eval
    cut = (plan.steps_per_epoch - last_steps) * step if last_steps else 0.0
    refit = RunPlan(
        **{
            **plan.__dict__,
            "epochs": epochs,
            "last_epoch_steps": last_steps,
            "elapsed_seconds": elapsed_seconds,
            "remaining_seconds": early + (epochs - begun) * whole_epoch - cut + final,
        }
    )
    return Replan(refit, step, plan.batch_size / step)
