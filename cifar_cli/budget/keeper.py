"""A time budget kept while the run goes: after every epoch, the epochs left are refit to what this run's own
epochs measured (a shared machine's speed drifts, and a start-up probe does not see what a real epoch pays), the
learning-rate schedule follows the new length without a jump, and an epoch that would run past the budget ends
early. Every re-plan is printed and recorded in plan.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cifar_cli.budget.plan import RunPlan, fit_steps
from cifar_cli.budget.probe import learn_from_epoch
from cifar_cli.budget.refit import REPLAN_TARGET_SHARE, EpochTiming, Replan, replan
from cifar_cli.recipe.optim import stretch_schedule
from cifar_cli.runtime import distributed
from cifar_cli.train.setup import Parts

# An epoch cut at its deadline still saves a checkpoint before the final evaluation: the deadline sits this far
# before the budget's end (seconds, at most this share of the budget), behind where re-plans aim (plan.py).
DEADLINE_MARGIN_SECONDS = 2.0
DEADLINE_MARGIN_SHARE = 0.02
PACE_WINDOW = 3  # refresh intervals an in-epoch pace is measured over
MIN_REFIT_STEPS = 1  # a refit that moves the run's end by fewer steps is not worth a schedule change
# An epoch teaches the cache the seconds of a step of the key's batch size only where its steps held at least this
# share of that batch on average: a training split smaller than one batch (tiny data, a subset) makes steps that
# are faster than the key says (a tiny-data run's 0.1 s against 1.7 s for a real 2,000-image step on a Xeon), and a
# later full-data run planned 17 epochs where 12 fitted.
FULL_STEP_SHARE = 0.9


class BudgetKeeper:
    """Owns the plan of a run: the steps of each epoch, the deadline inside one, and the re-plan after it."""

    def __init__(
        self, plan: RunPlan, clock: Callable[[], float], started: float, replanning: bool, eval_images: int
    ) -> None:
        self.plan, self.initial = plan, plan
        self.clock, self.started = clock, started  # `started`: the clock's reading when the budget began
        self.replanning = replanning and plan.budget_seconds is not None
        self.eval_images = eval_images  # scored after each epoch: their timing gives the evaluation's speed
        self.timings: list[EpochTiming] = []
        self.replans: list[dict[str, Any]] = []
        self._pace_epoch, self._pace_marks = (0, [(0.0, 0)])  # (clock, steps done) at this epoch's last refreshes
        # Refits inside the epoch in progress: the plan it began with and the latest refit, said after the epoch
        # where the number of epochs changed.
        self._during: tuple[RunPlan, Replan] | None = None

    def learn_speed(self, record: dict[str, Any], this_machine: bool) -> None:
        """The epoch's real speed into the calibration cache, for the next run's plan (`this_machine`: its speed
        is what the cache key describes); epochs on smaller images, or of steps short of the batch size, teach
        nothing about full-size steps."""
        if this_machine and record["steps"] and self.plan.step_cost(record["epoch"]) == 1.0 and self._full(record):
            eval_rate = self.eval_images / max(record["eval_seconds"], 1e-9)
            learn_from_epoch(self.plan.calibration, record["seconds"] / record["steps"], eval_rate)

    def _full(self, record: dict[str, Any]) -> bool:
        """Whether the epoch's steps were of about the batch size its speed is learned for."""
        images_per_step = record["images_per_second"] * record["seconds"] / record["steps"]
        batch_size = self.plan.calibration.key.get("batch_size") or 0
        return images_per_step >= FULL_STEP_SHARE * batch_size

    def steps(self, epoch: int) -> int:
        return self.plan.steps_in_epoch(epoch)

    def deadline(self) -> float | None:
        """The clock reading past which the epoch in progress stops, leaving the final evaluation its time."""
        if self.plan.budget_seconds is None:
            return None
        final = self.plan.final_seconds if not self.timings else self._measured_final_seconds()
        margin = min(DEADLINE_MARGIN_SECONDS, DEADLINE_MARGIN_SHARE * self.plan.budget_seconds)
        return self.started + self.plan.budget_seconds - final - margin

    def _measured_final_seconds(self) -> float:
        return self.plan.final_seconds_at(self.eval_images / max(self.timings[-1].eval_seconds, 1e-6))

    def after_epoch(
        self, record: dict[str, Any], epoch_seconds: float, epochs_done: int, global_step: int, parts: Parts
    ) -> str | None:
        """Record the epoch's timing; where the budget is kept, refit the epochs left and return what to say: a
        change of the number of epochs, inside the epoch (refit_during_epoch) or after it."""
        said_during = None
        if self._during is not None and self._during[1].plan.epochs != self._during[0].epochs:
            said_during = self._during[1].describe(self._during[0])
        self._during = None
        message = self._refit_after(record, epoch_seconds, epochs_done, global_step, parts)
        return "\n".join(text for text in (said_during, message) if text) or None

    def _refit_after(
        self, record: dict[str, Any], epoch_seconds: float, epochs_done: int, global_step: int, parts: Parts
    ) -> str | None:
        cost = self.plan.step_cost(record["epoch"])
        self.timings.append(
            EpochTiming(record["steps"], record["seconds"], record["eval_seconds"], epoch_seconds, cost)
        )
        if record.get("cut_short"):
            return self._stopped(record, epochs_done)
        if not self.replanning or epochs_done >= self.plan.epochs:  # none left to refit: the run ends as planned
            return None
        # Rank 0's clock decides for every process of a DDP run: all train the same steps and schedule.
        refit = distributed.broadcast_from_main(
            replan(self.plan, self.clock() - self.started, epochs_done, self.timings, self.eval_images)
        )
        before, after = self.plan, refit.plan
        changed = (after.epochs, after.last_epoch_steps) != (before.epochs, before.last_epoch_steps)
        if changed and not stretch_schedule(parts.scheduler, global_step, after.total_steps):
            self.replanning = False  # one-cycle keeps its length; the deadline still holds
            return None
        self.plan = after
        parts.total_steps = after.total_steps
        self.replans.append(
            {
                "after_epoch": epochs_done,
                "elapsed_seconds": after.elapsed_seconds,
                "epochs": after.epochs,
                "last_epoch_steps": after.last_epoch_steps or after.steps_per_epoch,
                "total_steps": after.total_steps,
                "measured_step_seconds": refit.step_seconds,
                "images_per_second": refit.images_per_second,
                "estimated_total_seconds": after.total_seconds,
            }
        )
        # Said when the number of epochs changes; a last epoch a few steps longer or shorter is plan.json's business.
        return refit.describe(before) if after.epochs != before.epochs else None

    def refit_during_epoch(
        self, epoch: int, steps_done: int, epoch_started: float, global_step: int, parts: Parts
    ) -> int | None:
        """At a refresh point of epoch `epoch`: the steps left refit to this epoch's own pace (a machine that got
        faster or slower since the last epoch ended), the schedule stretched to match; returns the epoch's new
        step limit, or None to keep it. Only in the last planned epoch, where no epoch end will re-plan again, and
        one on full-size images (the steps it adds are)."""
        now = self.clock()
        marks = self._pace_marks if self._pace_epoch == epoch else [(epoch_started, 0)]
        self._pace_epoch, self._pace_marks = epoch, [*marks, (now, steps_done)][-PACE_WINDOW - 1 :]
        mark_clock, mark_steps = self._pace_marks[0]
        if not self.replanning or epoch < self.plan.epochs or not self.timings or steps_done <= mark_steps:
            return None
        if self.plan.step_cost(epoch) != 1.0:  # a small epoch's pace says little about the full-size steps added
            return None
        # The pace of the last few refresh intervals: a change shows within them, one slow step does not rule.
        pace = (now - mark_clock) / (steps_done - mark_steps)
        last = self.timings[-1]
        # Evaluation costs scale with the machine's speed as the steps do (a load that stopped speeds up both).
        speed_change = pace / max(last.full_size_step_seconds, 1e-9)
        per_eval = (last.total_seconds - last.train_seconds) * speed_change
        final = self._measured_final_seconds() * speed_change
        available = self.started + self.plan.budget_seconds * REPLAN_TARGET_SHARE - now - final
        refit = distributed.broadcast_from_main(fit_steps(self.plan, available, epoch, steps_done, pace, per_eval))
        if refit is None or abs(refit.total_steps - self.plan.total_steps) < MIN_REFIT_STEPS:
            return None
        if not stretch_schedule(parts.scheduler, global_step, refit.total_steps):
            self.replanning = False
            return None
        began = self._during[0] if self._during is not None else self.plan
        # What the message says it will take: fit_steps keeps the last re-plan's estimate of the rest.
        left = (refit.total_steps - global_step) * pace + (refit.epochs - epoch + 1) * per_eval + final
        said = replace(refit, elapsed_seconds=now - self.started, remaining_seconds=left)
        self._during = (began, Replan(said, pace, refit.batch_size / pace, epoch))
        self.plan = refit
        parts.total_steps = refit.total_steps
        self.replans.append(
            {
                "during_epoch": epoch,
                "at_step": steps_done,
                "epochs": refit.epochs,
                "last_epoch_steps": refit.last_epoch_steps or refit.steps_per_epoch,
                "total_steps": refit.total_steps,
                "measured_step_seconds": pace,
                "elapsed_seconds": now - self.started,
            }
        )
        return refit.steps_in_epoch(epoch) if epoch == refit.epochs else refit.steps_per_epoch

    def _stopped(self, record: dict[str, Any], epochs_done: int) -> str:
        """The deadline ended the epoch in progress: the run ends here, as recorded in plan.json."""
        self.plan = replace(self.plan, epochs=epochs_done, last_epoch_steps=0, remaining_seconds=None)
        self.replans.append(
            {
                "after_epoch": epochs_done,
                "cut_short_at_step": record["steps"],
                "elapsed_seconds": self.clock() - self.started,
                "epochs": epochs_done,
            }
        )
        return (
            f"Time budget: epoch {epochs_done} stopped after {record['steps']} steps to leave the final evaluation "
            "its time; the run ends with the weights it has."
        )

    def to_json(self) -> dict[str, Any]:
        """plan.json: the plan in force, the one the run started with, and every re-plan in between."""
        return {**self.plan.to_json(), "initial": self.initial.to_json(), "replans": self.replans}
