"""Which rung of the recipe ladder (settings.LADDER: fast, balanced, accurate) a time budget buys on this machine.

A longer budget is better spent on a bigger network than on more epochs of a small one (airbench94 -> 95 -> 96:
wider, then deeper with cutout, each with its own schedule). The highest rung whose whole schedule, from speeds
measured here, fits the budget is trained, its epochs then stretched to fill the budget as every budget run is.
A rung is only measured when an optimistic guess (the rung below's measured epoch scaled by the networks'
multiply-adds) leaves it a chance: measuring a large network costs seconds that a short budget needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cifar_cli.budget.flops import train_step_flops_per_image
from cifar_cli.budget.plan import PLAN_SHARE, RunPlan
from cifar_cli.config.durations import format_duration
from cifar_cli.config.settings import Settings

# A larger network may use the machine better than a small one (bigger matrices): the guess that decides whether a
# rung is worth measuring assumes up to this many times the small one's FLOP rate.
BEST_EFFICIENCY_GAIN = 1.6


@dataclass(frozen=True)
class RungEstimate:
    preset: str
    model: str
    epochs: int  # the rung's whole schedule
    epoch_seconds: float  # one epoch here: training, evaluation, saving
    seconds: float  # the whole schedule here, final evaluation and time already spent included
    measured: bool  # from this rung's measured speeds; else guessed from the rung below's
    fits: bool


@dataclass(frozen=True)
class LadderChoice:
    preset: str
    budget_seconds: float
    estimates: tuple[RungEstimate, ...]

    def describe(self) -> str:
        chosen = next(e for e in self.estimates if e.preset == self.preset)
        budget, needs = format_duration(self.budget_seconds), format_duration(chosen.seconds)
        text = (
            f"Rung {chosen.preset} ({chosen.model}): its {chosen.epochs}-epoch schedule fits the budget of "
            f"{budget} (about {needs} here)"
            if chosen.fits
            else f"Rung {chosen.preset} ({chosen.model}), the lowest: its {chosen.epochs}-epoch schedule needs "
            f"about {needs} here, more than the budget of {budget}, so it trains fewer epochs"
        )
        above = [e for e in self.estimates if not e.fits and e.preset != self.preset]
        if above:
            rung = above[0]
            guess = "measured" if rung.measured else "guessed from the rung below"
            text += (
                f"; {rung.preset} ({rung.model}, {rung.epochs} epochs) would need about "
                f"{format_duration(rung.seconds)} ({guess})"
            )
        return text + "."

    def to_json(self) -> dict[str, Any]:
        return {"rung": self.preset, "rungs": [asdict(estimate) for estimate in self.estimates]}


def choose_rung(
    rungs: dict[str, Settings],
    budget_seconds: float,
    full_schedule: Callable[[Settings], RunPlan],
    flops_per_image: Callable[[str, float], float] = train_step_flops_per_image,
) -> LadderChoice:
    """Climb from the cheapest rung while the next one's whole schedule fits `budget_seconds` (the share a plan
    fills). `full_schedule(settings)` measures (or recalls) a rung's speeds and plans its whole schedule."""
    names = list(rungs)
    limit = budget_seconds * PLAN_SHARE
    chosen, below = names[0], full_schedule(rungs[names[0]])
    estimates = [_estimate(names[0], rungs[names[0]], below, True, limit)]
    for name in names[1:]:
        settings = rungs[name]
        per_epoch = _guessed_epoch_seconds(settings, below, rungs[chosen], flops_per_image)
        guess = below.elapsed_seconds + settings.train.epochs * per_epoch + below.final_seconds
        if guess > limit:  # not worth measuring: even at its best it would not fit
            estimates.append(
                RungEstimate(name, settings.model.name, settings.train.epochs, per_epoch, guess, False, False)
            )
            break
        plan = full_schedule(settings)
        estimates.append(_estimate(name, settings, plan, True, limit))
        if not estimates[-1].fits:
            break
        chosen, below = name, plan
    return LadderChoice(chosen, budget_seconds, tuple(estimates))


def full_schedule(measure: Callable[[Settings], RunPlan], device_type: str) -> Callable[[Settings], RunPlan]:
    """A rung's whole schedule (its own epochs, no budget) planned by `measure` (budget/measure.measure_plan), timed
    on the network a budget run on `device_type` trains (its activation): the chosen rung's plan then reads the
    same speeds from the cache instead of measuring again (10-12 s on a 2-core Zen 4), and real epochs teach them."""

    def plan(settings: Settings) -> RunPlan:
        unbudgeted = settings.model_copy(deep=True)
        # budgeted: a run that climbs the ladder trains its own network (no fine-tuning source)
        unbudgeted.model.activation = settings.model.activation_for(device_type, budgeted=True)
        unbudgeted.train.time_budget = None
        return measure(unbudgeted)

    return plan


def adopt_rung(current: Settings, preset: str) -> Settings:
    """The rung `preset`'s settings with the run's data, folders and starting weights (resolved by the run);
    `current` where `preset` is not one of its rungs."""
    rung = current.rungs.get(preset)
    if rung is None:
        return current
    adopted = rung.model_copy(deep=True)
    adopted.data, adopted.log = current.data, current.log
    adopted.train.init_from = current.train.init_from
    return adopted


def _estimate(name: str, settings: Settings, plan: RunPlan, measured: bool, limit: float) -> RungEstimate:
    seconds, epochs = plan.total_seconds, settings.train.epochs
    return RungEstimate(name, settings.model.name, epochs, plan.epoch_seconds, seconds, measured, seconds <= limit)


def _guessed_epoch_seconds(
    settings: Settings, below: RunPlan, below_settings: Settings, flops: Callable[[str, float], float]
) -> float:
    """An epoch of `settings` at the rung below's measured pace scaled by multiply-adds per image, as if the
    larger network used the machine BEST_EFFICIENCY_GAIN times better."""
    model, small = settings.model, below_settings.model
    ratio = flops(model.name, model.width_multiplier) / flops(small.name, small.width_multiplier)
    training = below.train_seconds_per_epoch * ratio / BEST_EFFICIENCY_GAIN
    return training + below.epoch_seconds - below.train_seconds_per_epoch  # evaluation and saving unscaled
