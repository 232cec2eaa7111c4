"""The recipe ladder: a time budget without a preset trains the highest rung (fast, balanced, accurate) whose whole
schedule fits it here, and the same command resumes on that rung."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cifar_cli.budget.ladder import choose_rung, full_schedule
from cifar_cli.budget.plan import RunPlan
from cifar_cli.config.settings import Settings, load_settings, parse_set_options
from cifar_cli.sweep.grid import Trial, trial_settings
from cifar_cli.train.run import plan_run, train
from tests.test_plan import fake_calibration

SPEEDS = {"airbench": 1000.0, "airbench-wide": 400.0, "airbench-deep": 250.0}  # train images/s of each network
FLOPS = {"airbench": 1.0, "airbench-wide": 2.5, "airbench-deep": 4.0}  # per image, relative


def _rungs(budget: str) -> dict[str, Settings]:
    return load_settings(None, {"train": {"time_budget": budget}}).rungs


def _choose(budget: str) -> tuple[str, list[str], str]:
    """(the rung chosen, the rungs measured, the explanation) with fake speeds: 50,000 images, 10,000 evaluated."""
    measured: list[str] = []

    def full_schedule(settings: Settings) -> RunPlan:
        measured.append(settings.preset)
        train = settings.train
        calibration = fake_calibration(SPEEDS[settings.model.name])
        return RunPlan(train.epochs, 1.0, train.batch_size, 50_000 // train.batch_size, 10_000, 2, calibration,
                       elapsed_seconds=5.0)  # fmt: skip

    rungs = _rungs(budget)
    budget_seconds = rungs["fast"].train.time_budget
    choice = choose_rung(rungs, budget_seconds, full_schedule, lambda name, width: FLOPS[name])
    return choice.preset, measured, choice.describe()


def test_a_short_budget_stays_on_fast_without_measuring_the_larger_networks() -> None:
    # fast's 8 epochs: about 11 min here; balanced's 15 epochs, even at 1.6x fast's FLOP rate, about 28 min.
    assert _choose("20m")[:2] == ("fast", ["fast"])
    chosen, measured, why = _choose("5m")  # not even fast's whole schedule: fast, shortened
    assert (chosen, measured) == ("fast", ["fast"]) and "the lowest: its 8-epoch schedule needs about 10 min" in why


@pytest.mark.parametrize(("device_type", "activation"), [("cpu", "silu"), ("cuda", None)])
def test_a_rung_is_timed_on_the_network_its_budget_run_trains(device_type: str, activation: str | None) -> None:
    # fast trains SiLU under a CPU budget: its rung estimate times that network, so the chosen rung's plan reads the
    # same speeds from the cache (a GELU estimate cost a second 10-12 s measurement on a 2-core Zen 4).
    seen: list[tuple[str | None, float | None]] = []

    def measure(settings: Settings) -> RunPlan:
        seen.append((settings.model.activation, settings.train.time_budget))
        return RunPlan(8, 1.0, 2000, 25, 0, 2, fake_calibration(1000.0))

    fast = _rungs("15m")["fast"]
    full_schedule(measure, device_type)(fast)
    assert seen == [(activation, None)] and fast.train.time_budget == 900  # the rung itself is left as it was


def test_an_hour_buys_the_wider_network() -> None:
    # balanced measured: about 41 min for 15 epochs; accurate at its best guess, about 1 h 46 min: not measured.
    chosen, measured, why = _choose("1h")
    assert (chosen, measured) == ("balanced", ["fast", "balanced"])
    assert "accurate (airbench-deep, 40 epochs) would need about" in why and "guessed" in why


def test_a_rung_whose_measured_schedule_does_not_fit_is_not_chosen() -> None:
    # accurate guessed at 1 h 46 min (worth measuring in 2.5 h), measured at 2 h 36 min: over 92% of 2.5 h.
    chosen, measured, why = _choose("2.5h")
    assert (chosen, measured) == ("balanced", ["fast", "balanced", "accurate"]) and "(measured)" in why


def test_a_long_budget_reaches_the_top_rung() -> None:
    assert _choose("3h")[:2] == ("accurate", ["fast", "balanced", "accurate"])


@pytest.mark.parametrize(
    "named",
    [
        {"preset": "fast"},
        {"model": {"name": "airbench"}},
        {"preset": "accurate"},
        {"train": {"init_from": "a.pth"}},
        {},
    ],
)
def test_only_a_budget_with_no_preset_model_or_source_named_climbs_the_ladder(named: dict) -> None:
    train = {**named.get("train", {}), "time_budget": "1h"}
    assert load_settings(None, {**named, "train": train} if named else {}).rungs == {}


def test_every_rung_keeps_the_users_flags() -> None:
    rungs = load_settings(None, {"train": {"time_budget": "1h", "seed": 7}, "optim": {"label_smoothing": 0.1}}).rungs
    assert {name: s.model.name for name, s in rungs.items()} == {
        "fast": "airbench", "balanced": "airbench-wide", "accurate": "airbench-deep"
    }  # fmt: skip
    assert {(s.train.seed, s.optim.label_smoothing, s.train.time_budget) for s in rungs.values()} == {(7, 0.1, 3600)}


def test_a_sweeps_trials_with_a_budget_stay_on_one_recipe() -> None:
    trial = Trial(0, {"optim.lr": 0.1}, ("optim.lr",), "t0")
    settings = trial_settings(trial, None, {"train": {"time_budget": "1h"}}, "budgeted", 0)
    assert settings.rungs == {} and (settings.preset, settings.optim.lr) == ("fast", 0.1)


def _ladder_settings(tmp_path: Path, prepared: Path, budget: str, *extra: str) -> Settings:
    """A budget run on the tiny data with no preset named: every rung at a quarter width, batches of 16."""
    options = [
        f"data.processed_dir={prepared}", f"log.checkpoint_dir={tmp_path / 'ck'}", f"log.log_dir={tmp_path / 'runs'}",
        "log.progress=none", "train.batch_size=16", "train.eval_batch_size=64", "train.device=cpu",
        "train.precision=fp32", "train.channels_last=true", "train.num_threads=1", "model.width_multiplier=0.25",
        f"train.time_budget={budget}", *extra,
    ]  # fmt: skip
    return load_settings(None, parse_set_options(options))


def test_a_ladder_run_trains_its_rung_and_the_same_command_resumes_on_it(tmp_path: Path, prepared_dir: Path) -> None:
    # --epochs sets every rung's schedule: one epoch of 90 images fits 20 s at any rung, so the top one is trained.
    settings = _ladder_settings(tmp_path, prepared_dir, "20s", "train.epochs=1")
    result = train(settings)
    plan = json.loads((result.run_dir / "plan.json").read_text())
    stored = yaml.safe_load((result.run_dir / "settings.yaml").read_text())
    assert result.run_name.startswith("ladder-") and plan["ladder"]["rung"] == "accurate"
    assert (stored["preset"], stored["model"]["name"], stored["train"]["augment"]["cutout"]) == (
        "accurate", "airbench-deep", 12
    )  # fmt: skip
    assert [e["preset"] for e in plan["ladder"]["rungs"]][0] == "fast" and plan["epochs"] == len(result.history)
    again = train(settings)  # the same command: the same run, on the rung it chose, nothing left to train
    assert again.run_name == result.run_name and again.resumed_from_epoch == plan["epochs"]


def test_a_dry_run_names_the_rung_and_why(tmp_path: Path, prepared_dir: Path) -> None:
    messages: list[str] = []

    class Collect:
        def message(self, text: str) -> None:
            messages.append(text)

    plan = plan_run(_ladder_settings(tmp_path, prepared_dir, "1h"), Collect())  # type: ignore[arg-type]
    [line] = [m for m in messages if m.startswith("Rung ")]
    # 90 tiny images: every rung's whole schedule fits an hour, so the top one is trained, stretched.
    assert line.startswith("Rung accurate (airbench-deep): its 40-epoch schedule fits the budget of 1 h 0 min")
    assert plan.ladder is not None and plan.ladder["rung"] == "accurate" and plan.epochs > 40
    [top] = [rung for rung in plan.ladder["rungs"] if rung["preset"] == "accurate"]
    assert plan.epoch_seconds == pytest.approx(top["epoch_seconds"])  # planned at the rung's own speed
    assert not (tmp_path / "runs").exists()


def test_a_dry_run_with_a_teacher_climbs_the_ladder(tmp_path: Path, prepared_dir: Path, tiny_checkpoint: Path) -> None:
    # The teacher is timed on noise of the data's size before the rung is chosen; the rung then rebuilds the data's
    # statistics, which must not need a fine-tuning source a dry run never reads.
    teacher = f"train.distill.teacher={tiny_checkpoint}"
    plan = plan_run(_ladder_settings(tmp_path, prepared_dir, "1h", teacher))
    assert plan.ladder is not None and plan.ladder["rung"] == "accurate"
    assert plan.calibration.teacher_seconds_per_image > 0
