"""Run plans from measured speeds: the time estimate, fitting a budget, the time left, durations."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cifar_cli.budget.plan import PLAN_SHARE, RemainingTime, RunPlan, fit_budget
from cifar_cli.budget.probe import Calibration
from cifar_cli.config.durations import format_duration, parse_duration
from cifar_cli.config.sections import ModelSettings
from cifar_cli.errors import UsageError
from cifar_cli.train.run import train
from tests.conftest import run_cli, tiny_settings


def fake_calibration(images_per_second: float, eval_images_per_second: float = 1000.0) -> Calibration:
    label = "fp32 + channels_last"
    return Calibration("fp32", True, {label: images_per_second}, eval_images_per_second, 0.5, 1.0)


def test_plan_estimates_from_the_measured_speeds() -> None:
    # 25 steps of 2000 at 100 img/s + 0.5 s optimiser: 512.5 s; validation 10,000 at 1000 img/s: 10 s.
    plan = RunPlan(8, 1.0, 2000, 25, 10_000, 2, fake_calibration(100.0), elapsed_seconds=4.0)
    assert plan.train_seconds_per_epoch == pytest.approx(512.5)
    assert plan.epoch_seconds == pytest.approx(512.5 + 10 + 1)
    assert plan.final_seconds == pytest.approx(60 + 3)  # flips and shifts: 6 views per image
    assert plan.total_seconds == pytest.approx(4 + 8 * 523.5 + 63)
    assert "8 epochs x 25 steps of 2000" in plan.describe()


def test_a_budget_picks_the_epochs_that_fit_and_cuts_the_last_to_fill_it() -> None:
    plan = fit_budget(3600, lambda: 5.0, lambda width: fake_calibration(100.0), 1.0, 25, 2000, 10_000, 2)
    assert plan.width_multiplier == 1.0
    # 3600 x 0.92 - 5 s spent - 63 s final evaluation = 3,244 s: 6 epochs of 523.5 s, then 103 s, of which the 7th
    # epoch's evaluation and writes take 11 s: 4 steps of 20.5 s.
    assert (plan.epochs, plan.last_epoch_steps, plan.total_steps) == (7, 4, 6 * 25 + 4)
    step = 2000 / 100 + 0.5
    assert plan.total_seconds <= 3600 * PLAN_SHARE < plan.total_seconds + step
    assert "Plan: 7 epochs x 25 steps of 2000 (the last cut to 4 steps)" in plan.describe()


def test_a_budget_of_two_epochs_less_a_bit_plans_one_and_most_of_another() -> None:
    """The issue's case: a 4-minute budget where an epoch takes about 2 minutes plans 1.x epochs, not 1 (which left a
    third of the budget unused)."""
    plan = fit_budget(240, lambda: 10.0, lambda width: fake_calibration(500.0), 1.0, 25, 2000, 10_000, 2)
    assert plan.epochs == 2 and 0 < plan.last_epoch_steps < 25
    assert 0.9 * 240 * PLAN_SHARE < plan.total_seconds <= 240 * PLAN_SHARE
    one = RunPlan(1, 1.0, 2000, 25, 10_000, 2, fake_calibration(500.0), 240, 10.0)
    assert "Plan: 1 epoch x 25 steps" in one.describe()  # no "1 epochs"


def test_a_budget_trains_its_small_epochs_first_at_their_measured_cost_then_fills_the_rest() -> None:
    """train.low_res under a budget: 3 epochs on 16-pixel images at a quarter of a full-size step's seconds, then
    full-size epochs, the last cut short; a budget too short for them and one full-size epoch drops small ones, and
    the small step is timed only at a width where a full-size epoch fits."""
    timed: list[float] = []

    def time_small(calibration: Calibration, width: float) -> Calibration:
        timed.append(width)
        return replace(calibration, low_res_shares={"16": 0.25})  # 4.5 s a full-size step, 1.125 s a small one

    def plan_for(budget: float, calibrate_at=lambda width: fake_calibration(500.0)) -> RunPlan:  # noqa: ANN001
        return fit_budget(budget, lambda: 10.0, calibrate_at, 1.0, 25, 2000, 10_000, 2, 0, 1.0, (3, 16), time_small)

    plan = plan_for(600)
    # 552 s - 10 s spent - 63 s final = 479 s: 3 small epochs of 28.1 + 11 s, 2 full-size ones of 123.5 s, and
    # 114.6 s left: the 11 s of a third one's evaluation and writes, and 23 steps of 4.5 s.
    assert (plan.low_res_epochs, plan.epochs, plan.last_epoch_steps) == (3, 6, 23)
    assert 0.9 * 600 * PLAN_SHARE < plan.total_seconds <= 600 * PLAN_SHARE
    assert "(the first 3 at 16 x 16 px, the last cut to 23 steps)" in plan.describe()
    # The time left at the start counts the cheaper epochs too (all but the epoch in progress's 1 s of writes).
    assert plan.total_seconds == pytest.approx(10 + 1 + RemainingTime(plan, 0).during_epoch(0))
    short = plan_for(240)
    assert short.low_res_epochs == 0 and short.width_multiplier == 1.0  # no room for small epochs and a full one
    timed.clear()
    narrow = plan_for(300, lambda width: fake_calibration(100.0 / width**2))  # full size fits from x0.5 on
    assert narrow.width_multiplier == 0.5 and timed == [0.5]


def test_a_budget_too_short_for_one_epoch_narrows_the_network() -> None:
    widths = []

    def calibrate_at(width: float) -> Calibration:
        widths.append(width)
        return fake_calibration(100.0 / width**2)  # convolutions cost about width squared

    plan = fit_budget(300, lambda: 5.0, calibrate_at, 1.0, 25, 2000, 10_000, 0)
    assert widths == [1.0, 0.75, 0.5] and plan.width_multiplier == 0.5 and plan.epochs >= 1
    assert plan.total_seconds <= 300


def test_a_narrower_recipe_width_is_planned_only_where_the_full_width_trains_too_few_epochs() -> None:
    """model.cpu_budget_width_below_epochs: the full width is planned first and kept where it trains at least
    that many epochs; a shorter budget plans the recipe's narrower width (whose time spent measuring counts)."""
    widths: list[float] = []

    def calibrate_at(width: float) -> Calibration:
        widths.append(width)
        return fake_calibration(500.0 / width**2)

    def plan_for(budget: float) -> RunPlan:
        return fit_budget(budget, lambda: 5.0, calibrate_at, 0.75, 25, 2000, 10_000, 0, wider=(1.0, 10))

    long = plan_for(2400)  # about 17 epochs of 2 minutes at full width
    assert (long.width_multiplier, widths) == (1.0, [1.0]) and long.epochs >= 10
    widths.clear()
    short = plan_for(1200)  # 8 and a part at full width: too few
    assert (short.width_multiplier, widths) == (0.75, [1.0, 0.75]) and short.epochs > 8
    assert ModelSettings(cpu_budget_width=0.75, cpu_budget_width_below_epochs=10).wider_budget_width("cpu") == (1, 10)
    assert ModelSettings(cpu_budget_width=0.75).wider_budget_width("cpu") is None  # narrower under every budget
    assert ModelSettings(cpu_budget_width=0.75, cpu_budget_width_below_epochs=10).wider_budget_width("cuda") is None


def test_a_budget_nothing_fits_is_a_clear_error() -> None:
    with pytest.raises(UsageError, match="too short"):
        fit_budget(20, lambda: 5.0, lambda width: fake_calibration(10.0), 1.0, 25, 2000, 10_000, 0)


def test_time_left_follows_the_run_once_it_has_measured() -> None:
    plan = RunPlan(4, 1.0, 2000, 25, 10_000, 0, fake_calibration(100.0))
    remaining = RemainingTime(plan, epochs_done=1)
    before = remaining.during_epoch(0)
    assert before == pytest.approx(plan.train_seconds_per_epoch + plan.val_seconds + 2 * plan.epoch_seconds + 13)
    remaining.epoch_started -= 100.0  # pretend the first 5 batches took 100 s: 20 s per batch, not 20.5
    assert remaining.during_epoch(5) == pytest.approx(20 * 20 + 10 + 2 * plan.epoch_seconds + 13, rel=1e-3)
    remaining.epoch_started -= 400.0
    left = remaining.end_epoch()  # this epoch took ~500 s: the next two are expected to take as long
    assert left == pytest.approx(2 * 500 + 13, rel=1e-3)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2.5min", 150), ("120", 120), (45, 45)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "15x", "-5m", "0", "m", "1h-5m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (45, 725, 5400)] == ["45 s", "12 min 5 s", "1 h 30 min"]


def test_a_bad_time_budget_flag_exits_2() -> None:
    result = run_cli("train", "--time-budget", "soon", "--dry-run")
    assert result.exit_code == 2 and "train.time_budget" in result.output


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path: Path) -> None:
    result = run_cli("train", "--dry-run", "--model", "seed-cnn", "--device", "cpu", "--time-budget", "10m",
         "--processed-dir", str(tmp_path / "nothing"), "--checkpoint-dir", str(tmp_path / "ck"),
         "--log-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "precision auto -> " in result.output and "Plan: " in result.output
    # 50,000 CIFAR-10 images less the 5,000 held out for baseline's plateau scheduler, / 128
    assert "steps of 128" in result.output and "351 steps" in result.output
    assert "Dry run: nothing was trained." in result.output
    assert not any((tmp_path / name).exists() for name in ("nothing", "ck", "runs"))


def test_a_budget_run_stores_its_plan_and_ends_in_time(tmp_path: Path, prepared_dir: Path) -> None:
    settings = tiny_settings(
        tmp_path, prepared_dir, "train.time_budget=20s", "train.epochs=1", "train.channels_last=auto",
        "train.precision=auto",
    )  # fmt: skip
    result = train(settings)
    plan = json.loads((result.run_dir / "plan.json").read_text())
    stored = (result.run_dir / "settings.yaml").read_text()
    assert plan["budget_seconds"] == 20 and plan["epochs"] == len(result.history) >= 2  # not the 1 asked for
    assert f"epochs: {plan['epochs']}" in stored and f"precision: {plan['precision']}" in stored
    assert "precision: auto" not in stored and "channels_last: auto" not in stored
    # Not a timing test (the fake clocks of test_budget.py are): a bound that only a run ignoring its budget breaks.
    assert result.final_metrics["wall_seconds"] <= 20 * 1.5
    # The same command again resumes with the plan it started with, whatever the machine measures now.
    again = train(settings)
    assert again.resumed_from_epoch == plan["epochs"] and again.plan.epochs == plan["epochs"]
