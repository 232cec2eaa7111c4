"""A time budget kept while the run goes (budget/keeper.py): re-plans from the run's own epochs on a fake clock whose
speed changes mid-run, a schedule that follows without a jump, a deadline inside an epoch, and plan.json."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cifar_cli.budget.refit import EpochTiming, replan
from cifar_cli.config.sections import SchedulerSettings
from cifar_cli.errors import UsageError
from cifar_cli.predict.inference import load_model
from cifar_cli.recipe.optim import _StepSchedule
from cifar_cli.train.loop import EpochRunner
from cifar_cli.train.run import Trainer, train
from cifar_cli.train.tracking import NullReporter
from tests.conftest import tiny_settings

BUDGET = 100.0  # fake seconds
MESSAGES: dict[Path, Messages] = {}  # what each test's run said, by its folder


class FakeClock:
    """Fake seconds: each optimiser step costs `step_cost` (changed mid-run to mimic a shared machine slowing
    down), and every reading a millisecond, so evaluation passes take time too."""

    def __init__(self) -> None:
        self.now, self.step_cost, self.steps = 0.0, 0.5, 0
        self.small_steps = 0  # steps on images under 32 pixels a side, which cost a quarter of a full-size step

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


class Messages(NullReporter):
    """A reporter that keeps what the run says."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def message(self, text: str) -> None:
        self.said.append(text)


def _budget_run(tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch, slow_down_after: int,
                factor: float, step_cost: float = 0.5, *extra: str) -> tuple[Trainer, list[float], FakeClock]:  # fmt: skip
    clock, rates = FakeClock(), []
    clock.step_cost = step_cost
    real_step = EpochRunner._step

    def timed_step(self, images, targets):  # noqa: ANN001, ANN202
        clock.steps += 1
        share = 0.25 if images.shape[-1] < 32 else 1.0
        clock.small_steps += share < 1
        clock.now += share * (clock.step_cost if clock.steps <= slow_down_after else clock.step_cost * factor)
        rates.append(self.parts.optimizer.param_groups[0]["lr"])
        return real_step(self, images, targets)

    monkeypatch.setattr(EpochRunner, "_step", timed_step)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # what the fake clock teaches stays here
    settings = tiny_settings(tmp_path, prepared_dir, f"train.time_budget={BUDGET}", "scheduler.name=linear",
                             "scheduler.final_lr_factor=0.0", "train.epochs=1", *extra)  # fmt: skip
    trainer = Trainer(settings, reporter=MESSAGES.setdefault(tmp_path, Messages()), clock=clock)
    trainer.run()
    return trainer, rates, clock


@pytest.mark.parametrize(("slow_down_after", "factor"), [(30, 2.0), (30, 0.5)], ids=["slower", "faster"])
def test_a_run_refits_its_epochs_when_the_machine_changes_speed(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch, slow_down_after: int, factor: float
) -> None:
    trainer, rates, clock = _budget_run(tmp_path, prepared_dir, monkeypatch, slow_down_after, factor)
    # A re-plan is said when the number of epochs changes, not for a last epoch a few steps longer or shorter.
    said = [line for line in MESSAGES[tmp_path].said if line.startswith("Re-planned")]
    changes = [re.match(r"Re-planned(?: during epoch \d+)?: (\d+) epochs?.* instead of (\d+) epochs?", line).groups()
               for line in said]  # fmt: skip
    assert changes and all(new != old for new, old in changes), said
    final = json.loads((trainer.run_dir / "final_metrics.json").read_text())
    assert 0.9 * BUDGET <= final["wall_seconds"] <= BUDGET  # the fake clock's, start to final evaluation
    plan = json.loads((trainer.run_dir / "plan.json").read_text())
    assert plan["replans"][0]["epochs"] != plan["initial"]["epochs"]  # the probe's real milliseconds were wrong
    assert len(plan["replans"]) >= 2 and plan["epochs"] == len(trainer.progress.history)
    speeds = [replan_["measured_step_seconds"] for replan_ in plan["replans"]]
    assert speeds[0] == pytest.approx(0.5, rel=0.05) and speeds[-1] == pytest.approx(0.5 * factor, rel=0.2)
    # The schedule followed every new length without a jump, and ended at zero.
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates, rates[1:]))
    assert max(earlier - later for earlier, later in zip(rates, rates[1:])) < 0.1 * rates[0]
    assert trainer.parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert plan["total_steps"] == clock.steps == trainer.progress.global_step
    stored = (trainer.run_dir / "settings.yaml").read_text()
    assert f"epochs: {plan['epochs']}" in stored


def test_a_machine_that_speeds_up_in_the_last_epoch_gets_its_budget_used(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load stops during what the epoch-end re-plans took for the last epoch: its own pace, measured at each
    refresh point, extends the run (another epoch here) instead of ending it at three quarters of the budget."""
    trainer, rates, _ = _budget_run(tmp_path, prepared_dir, monkeypatch, slow_down_after=44, factor=0.125,
                                    step_cost=2.0)  # fmt: skip
    final = json.loads((trainer.run_dir / "final_metrics.json").read_text())
    plan = json.loads((trainer.run_dir / "plan.json").read_text())
    during = [entry for entry in plan["replans"] if "during_epoch" in entry]
    assert during
    # ... and said, once the epoch has ended, where it changed the number of epochs (here it added one).
    said = [line for line in MESSAGES[tmp_path].said if "Re-planned during" in line]
    assert said and f"during epoch {during[0]['during_epoch']}: {during[0]['epochs']} epochs" in said[0], said
    assert 0.9 * BUDGET <= final["wall_seconds"] <= BUDGET
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates, rates[1:]))
    assert trainer.parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_an_epoch_that_would_overrun_the_budget_ends_at_its_deadline(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, _, _ = _budget_run(tmp_path, prepared_dir, monkeypatch, 158, 16.0, 0.5, "train.lookahead=true")
    final = json.loads((trainer.run_dir / "final_metrics.json").read_text())
    assert final["wall_seconds"] <= BUDGET
    assert trainer.progress.history[-1].get("cut_short") is True
    plan = json.loads((trainer.run_dir / "plan.json").read_text())
    assert plan["replans"][-1]["cut_short_at_step"] < plan["steps_per_epoch"]
    assert (trainer.checkpoint_dir / "last.pth").is_file() and final["accuracy"] >= 0
    # The epoch the deadline cut is the run's last: lookahead handed back its average.
    assert_ends_on_the_average(trainer.checkpoint_dir / "last.pth")


def test_a_budget_run_trains_its_small_epochs_first_and_fills_the_rest_at_full_size(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.low_res under a budget: the planned epochs on 16-pixel images train first (a quarter of a full-size
    step's fake seconds, the share the probe is made to measure), full-size epochs fill the rest, every re-plan
    reads the pace as full-size steps', and the run ends inside 90-100% of its budget."""
    from cifar_cli.budget import measure as measure_module

    def quarter(calibration, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return replace(calibration, low_res_shares={"16": 0.25})

    monkeypatch.setattr(measure_module, "measure_low_res_share", quarter)
    small = ("model.name=airbench", "train.low_res.size=16", "train.low_res.epochs=2", "train.low_res.scope=cpu_budget")
    trainer, _, clock = _budget_run(tmp_path, prepared_dir, monkeypatch, 10**6, 1.0, 0.5, *small)
    plan = json.loads((trainer.run_dir / "plan.json").read_text())
    final = json.loads((trainer.run_dir / "final_metrics.json").read_text())
    assert plan["low_res"] == {"epochs": 2, "size": 16, "step_cost": 0.25}
    assert clock.small_steps == 2 * plan["steps_per_epoch"] and plan["epochs"] > 2
    assert 0.9 * BUDGET <= final["wall_seconds"] <= BUDGET
    paces = [entry["measured_step_seconds"] for entry in plan["replans"] if "after_epoch" in entry]
    assert paces and all(pace == pytest.approx(0.5, rel=0.1) for pace in paces), paces


def assert_ends_on_the_average(checkpoint: Path) -> None:
    """The saved weights are lookahead's average (as its final hand-back leaves them), not the last step's."""
    import torch

    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] % 5, "a sync every 5 steps would hand the average back anyway: pick other sizes"
    for name, average in state["lookahead_state"].items():
        assert torch.equal(state["model_state"][name], average), name


def test_a_stale_slow_calibration_no_longer_ends_the_run_early(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached speed a third of the real one (measured while the machine was busy) plans a third of the steps
    that fit; the run's own epochs correct it, and it ends inside 90-100% of its budget."""
    from cifar_cli.budget import measure as measure_module
    from tests.test_plan import fake_calibration

    stale = fake_calibration(16.0)  # batch 16: 16 / 16 + 0.5 = 1.5 s per step, against the 0.5 s of the clock
    monkeypatch.setattr(measure_module, "measure_speed", lambda *args, **kwargs: stale)
    trainer, _, _ = _budget_run(tmp_path, prepared_dir, monkeypatch, slow_down_after=10**6, factor=1.0)
    plan = json.loads((trainer.run_dir / "plan.json").read_text())
    final = json.loads((trainer.run_dir / "final_metrics.json").read_text())
    assert plan["epochs"] >= 2 * plan["initial"]["epochs"]
    assert 0.9 * BUDGET <= final["wall_seconds"] <= BUDGET


def test_replan_aims_inside_the_budget_and_cuts_the_last_epoch_rather_than_waste_it() -> None:
    from cifar_cli.budget.plan import RunPlan
    from tests.test_plan import fake_calibration

    plan = RunPlan(50, 1.0, 16, 10, 100, 0, fake_calibration(1000.0), 100.0, 10.0, 100)
    timings = [EpochTiming(10, 5.0, 0.5, 6.0)]  # 0.5 s per step, 1 s of evaluation and writes per epoch
    refit = replan(plan, elapsed_seconds=16.0, epochs_done=1, timings=timings, eval_images=plan.val_images)
    assert refit.step_seconds == pytest.approx(0.5)
    assert 0.9 * 100 <= refit.plan.total_seconds <= 100
    assert refit.plan.last_epoch_steps in range(3, 10)  # a partial last epoch fills the rest
    assert refit.plan.total_steps == (refit.plan.epochs - 1) * 10 + refit.plan.last_epoch_steps


def test_replan_reads_small_epochs_as_full_size_steps_at_their_planned_share() -> None:
    """After an epoch on 16-pixel images (a quarter of a full-size step's seconds), the full-size epochs left are
    planned at the measured pace scaled to full size, after the small epochs still to come."""
    from cifar_cli.budget.plan import RunPlan
    from tests.test_plan import fake_calibration

    plan = RunPlan(50, 1.0, 16, 10, 100, 0, fake_calibration(1000.0), 100.0, 10.0, 100, low_res_epochs=3,
                   low_res_size=16, low_res_cost=0.25)  # fmt: skip
    timings = [EpochTiming(10, 1.25, 0.5, 2.25, cost=0.25)]  # 0.125 s per small step: 0.5 s at full size
    refit = replan(plan, elapsed_seconds=12.25, epochs_done=1, timings=timings, eval_images=plan.val_images)
    assert refit.step_seconds == pytest.approx(0.5)
    # 96 s - 12.25 s - 3.5 s final = 80.25 s: 2 more small epochs of 1.25 + 1 s, 12 full-size ones of 5 + 1 s,
    # and 3.75 s left: a last epoch's 1 s of evaluation and writes and 5 steps of 0.5 s.
    assert (refit.plan.epochs, refit.plan.last_epoch_steps) == (16, 5)
    assert refit.plan.total_seconds == pytest.approx(12.25 + 4.5 + 12 * 6 + 3.5 + 3.5)


def test_a_stretched_schedule_continues_from_its_rate() -> None:
    schedule = _StepSchedule(SchedulerSettings(name="cosine", final_lr_factor=0.0), 0, 100)
    before = schedule(40)
    schedule.retarget(40, 300)
    assert schedule(40) == pytest.approx(before) and schedule(300) == pytest.approx(0.0)
    assert schedule(41) < before and before - schedule(41) < 0.01


def test_a_cpu_budget_plans_at_the_width_the_recipe_names_for_it(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.cpu_budget_width: a time-budget run on a CPU plans, builds and saves the narrower network; a run with
    no budget, or on a GPU, keeps width_multiplier."""
    import torch

    from cifar_cli.config.sections import ModelSettings
    from cifar_cli.models import build_model

    trainer, _, _ = _budget_run(tmp_path, prepared_dir, monkeypatch, 10**6, 1.0, 0.5, "model.name=airbench",
                                "model.cpu_budget_width=0.5")  # fmt: skip
    plan = json.loads((trainer.run_dir / "plan.json").read_text())
    assert plan["width_multiplier"] == 0.5
    trained = sum(p.numel() for p in trainer.parts.model.parameters())
    assert trained == sum(p.numel() for p in build_model("airbench", 0.5, 10).parameters())
    assert trained < sum(p.numel() for p in build_model("airbench", 1.0, 10).parameters())
    saved = torch.load(trainer.checkpoint_dir / "last.pth", weights_only=False)
    assert saved["settings"]["model"]["width_multiplier"] == 0.5
    model = ModelSettings(name="airbench", cpu_budget_width=0.75)
    assert [model.width_for("cpu", True), model.width_for("cpu", False), model.width_for("cuda", True)] == [0.75, 1, 1]


def test_a_cpu_budget_trains_its_own_activation_and_a_fixed_run_the_models(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.cpu_budget_activation (fast: silu) is what a CPU budget builds, says and keeps in its checkpoint."""
    extra = ("model.name=airbench", "model.width_multiplier=0.25", "model.cpu_budget_activation=silu")
    trainer, _, _ = _budget_run(tmp_path, prepared_dir, monkeypatch, 10**6, 1.0, 0.5, *extra)
    assert {type(group.activation) for group in trainer.parts.model.groups} == {torch.nn.SiLU}
    assert json.loads((trainer.run_dir / "plan.json").read_text())["initial"]["activation"] == "silu"
    assert any(line.startswith("Plan:") and ", silu," in line for line in MESSAGES[tmp_path].said)
    assert load_model(trainer.checkpoint_dir / "last.pth", torch.device("cpu")).model.groups[0].activation.__class__ \
        is torch.nn.SiLU  # fmt: skip
    fixed = Trainer(tiny_settings(tmp_path, prepared_dir, *extra, "train.epochs=1", "train.run_name=fixed"))
    fixed.run()
    assert {type(group.activation) for group in fixed.parts.model.groups} == {torch.nn.GELU}


def test_fine_tuning_under_a_cpu_budget_trains_the_network_its_weights_came_from(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU budget's own width and activation are for a network it builds: a run from another checkpoint's
    weights keeps the width and the activation they were trained with."""
    net = ("model.name=airbench", "model.width_multiplier=0.25")
    source = train(tiny_settings(tmp_path / "source", prepared_dir, *net, "model.activation=silu", "train.epochs=1"))
    tuned = (*net, "model.cpu_budget_width=0.125", "model.cpu_budget_activation=gelu",
             f"train.init_from={source.checkpoint_dir / 'last.pth'}")  # fmt: skip
    trainer, _, _ = _budget_run(tmp_path, prepared_dir, monkeypatch, 10**6, 1.0, 0.5, *tuned)
    assert trainer.settings.model.width_multiplier == 0.25
    assert {type(group.activation) for group in trainer.parts.model.groups} == {torch.nn.SiLU}


def test_the_same_budget_run_twice_ends_as_a_finished_run(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan's choices (SiLU, width, epochs) are kept apart from the request: the same command again finds its
    finished run instead of refusing it as another recipe; so does a checkpoint of a version that kept no request."""
    extra = ("model.name=airbench", "model.width_multiplier=0.25", "model.cpu_budget_activation=silu")
    first, _, _ = _budget_run(tmp_path, prepared_dir, monkeypatch, 10**6, 1.0, 0.5, *extra)
    saved = torch.load(first.checkpoint_dir / "last.pth", weights_only=False)
    assert saved["settings"]["model"]["activation"] == "silu" and saved["request"]["model"]["activation"] is None
    request = (first.run_dir / "request.yaml").read_text()
    assert "activation: null" in request and "activation: silu" in (first.run_dir / "settings.yaml").read_text()
    refused = tiny_settings(tmp_path, prepared_dir, *extra, f"train.time_budget={BUDGET}", "scheduler.name=linear",
                            "scheduler.final_lr_factor=0.0", "train.epochs=1", f"train.run_name={first.run_name}",
                            "model.activation=gelu")  # fmt: skip
    with pytest.raises(UsageError, match="model.activation: None in the run, 'gelu' now"):
        Trainer(refused).run()  # asking for another activation than the run trained is still another recipe
    for older in (False, True):
        if older:  # as an earlier version saved it: the planned settings only
            del saved["request"]
            torch.save(saved, first.checkpoint_dir / "last.pth")
        again, _, _ = _budget_run(tmp_path, prepared_dir, monkeypatch, 10**6, 1.0, 0.5, *extra)
        assert again.run_name == first.run_name and again.progress.epoch == first.progress.epoch
        assert any("already finished" in line for line in MESSAGES[tmp_path].said)
        MESSAGES[tmp_path].said.clear()
