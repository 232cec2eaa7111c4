"""Precision and memory layout chosen by measurement: faked CPU kinds, the cache, and a real run on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_cli.budget import probe as probe_module
from cifar_cli.budget.probe import Layout, cache_dir, candidates, measure_speed
from cifar_cli.config.sections import ModelSettings, OptimSettings
from tests.conftest import run_cli

CPU = torch.device("cpu")
SEED_CNN = ModelSettings(name="seed-cnn", width_multiplier=0.25)
ADAM = OptimSettings(name="adam")

# Train-step images/s per layout, as measured on the project's CPU kinds (airbench, README and issue 13).
AVX2_EPYC = {"fp32": 98, "fp32 + channels_last": 130, "bf16": 8, "bf16 + channels_last": 8}
AMX_XEON = {"fp32": 185, "fp32 + channels_last": 250, "bf16": 314, "bf16 + channels_last": 511}
ZEN4_AVX512_BF16 = {"fp32": 215, "fp32 + channels_last": 255, "bf16": 350, "bf16 + channels_last": 440}


@pytest.fixture
def fake_speeds(monkeypatch: pytest.MonkeyPatch):
    """Replace the timed steps by a CPU kind's speeds; records every forward/backward each layout was asked for."""
    calls: list[tuple[str, int]] = []

    def install(speeds: dict[str, float]) -> list[tuple[str, int]]:
        def step(self, images: int, optimizer_step: bool = False) -> tuple[float, float]:
            calls.append((self.layout.label, images))
            return images / speeds[self.layout.label], 0.01 if optimizer_step else 0.0

        monkeypatch.setattr(probe_module._Probe, "step", step)
        monkeypatch.setattr(probe_module._Probe, "eval_images_per_second", lambda self: 1000.0)
        return calls

    return install


@pytest.mark.parametrize(
    ("speeds", "expected"),
    [
        (AVX2_EPYC, Layout("fp32", True)),
        (AMX_XEON, Layout("bf16", True)),
        (ZEN4_AVX512_BF16, Layout("bf16", True)),
        ({**AVX2_EPYC, "fp32": 140}, Layout("fp32", False)),
    ],
    ids=["avx2", "amx", "zen4", "contiguous-faster"],
)
def test_auto_picks_the_fastest_layout_and_never_one_slower_than_fp32(fake_speeds, speeds, expected) -> None:
    calls = fake_speeds(speeds)
    result = measure_speed(SEED_CNN, ADAM, 128, CPU, use_cache=False)
    assert result.layout == expected
    assert result.images_per_second >= max(speeds["fp32"], speeds["fp32 + channels_last"])
    assert result.precision == ("bf16" if speeds["bf16 + channels_last"] > speeds["fp32 + channels_last"] else "fp32")
    assert "precision auto -> " + expected.label in result.summary()
    # The winner is timed again on steps of the run's batch (warm-up + one timed), the estimate's speed.
    assert calls.count((expected.label, 128)) == 2
    assert result.batch_images_per_second == pytest.approx(speeds[expected.label])
    assert result.step_seconds(128) == pytest.approx(128 / speeds[expected.label] + 0.01)


def test_a_much_slower_candidate_costs_one_tiny_step(fake_speeds) -> None:
    calls = fake_speeds(AVX2_EPYC)
    result = measure_speed(SEED_CNN, ADAM, 128, CPU, use_cache=False)
    # bf16 on an AVX2 CPU: a warm-up and a screening step of a few images, then it is dropped.
    assert [images for label, images in calls if label.startswith("bf16")] == [8, 8, 8, 8]
    assert result.train_images_per_second["bf16 + channels_last"] == pytest.approx(8)


def test_explicit_precision_and_layout_are_kept(fake_speeds) -> None:
    fake_speeds(AMX_XEON)
    assert measure_speed(SEED_CNN, ADAM, 128, CPU, "fp32", use_cache=False).layout == Layout("fp32", True)
    assert measure_speed(SEED_CNN, ADAM, 128, CPU, "bf16", False, use_cache=False).layout == Layout("bf16", False)


def test_gpus_keep_the_rule_and_time_only_it() -> None:
    assert candidates("auto", "auto", torch.device("mps")) == [Layout("fp16", True)]
    assert candidates("auto", "auto", CPU) == [
        Layout("fp32", True),
        Layout("fp32", False),
        Layout("bf16", True),
        Layout("bf16", False),
    ]


def test_the_decision_is_cached_per_machine_model_and_batch(fake_speeds, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = fake_speeds(AVX2_EPYC)
    first = measure_speed(SEED_CNN, ADAM, 128, CPU)
    measured = len(calls)
    second = measure_speed(SEED_CNN, ADAM, 128, CPU)
    assert (first.cached, second.cached) == (False, True) and len(calls) == measured
    assert second.layout == first.layout and second.train_images_per_second == first.train_images_per_second
    assert "(cached)" in second.summary()
    measure_speed(SEED_CNN, ADAM, 256, CPU)  # another batch size: measured again
    assert len(calls) > measured
    stored = json.loads((cache_dir() / "calibration.json").read_text())
    assert len(stored) == 2 and all('"cpu"' in key and '"torch"' in key for key in stored)


def test_a_damaged_or_unwritable_cache_only_costs_a_measurement(fake_speeds, monkeypatch, tmp_path) -> None:
    fake_speeds(AVX2_EPYC)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "calibration.json").write_text("{not json")
    assert measure_speed(SEED_CNN, ADAM, 128, CPU).layout == Layout("fp32", True)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert measure_speed(SEED_CNN, ADAM, 128, CPU).cached is False


def test_real_calibration_measures_every_candidate_on_this_machine() -> None:
    result = measure_speed(ModelSettings(name="airbench", width_multiplier=0.25), OptimSettings(name="muon"), 64, CPU,
                       use_cache=False)  # fmt: skip
    rates = result.train_images_per_second
    assert set(rates) == {layout.label for layout in candidates("auto", "auto", CPU)}
    assert all(rate > 0 for rate in rates.values()) and result.layout.label in rates
    assert result.eval_images_per_second > 0 and result.optimizer_seconds > 0


def test_smaller_images_are_timed_against_full_size_ones_and_the_share_is_cached(monkeypatch, tmp_path) -> None:
    """train.low_res: a real airbench step on 16-pixel images, timed beside a 32-pixel one in the chosen layout,
    takes a share of its seconds under one; the next run reads that share from the cache instead of measuring."""
    from cifar_cli.budget.probe import measure_low_res_share

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, optim = ModelSettings(name="airbench", width_multiplier=0.5), OptimSettings(name="muon")
    calibration = measure_speed(model, optim, 64, CPU, "fp32", True)
    measured = measure_low_res_share(calibration, model, optim, 64, CPU, 16)
    assert 0 < measured.low_res_share(16) < 1 and "16 x 16 images" in measured.describe_low_res(16)
    cached = measure_speed(model, optim, 64, CPU, "fp32", True)
    assert cached.cached and cached.low_res_share(16) == measured.low_res_share(16)
    monkeypatch.setattr(probe_module, "_Probe", None)  # measuring again would fail
    assert measure_low_res_share(cached, model, optim, 64, CPU, 16).low_res_share(16) == measured.low_res_share(16)


def test_a_cpu_without_native_bf16_is_given_fp32() -> None:
    """The AVX2 kind (bf16 14-16x slower), approximated on any x86 CPU by capping both kernel libraries
    (../shared/DESIGN.md): the real measurement there must choose fp32, whatever this machine's own choice is."""
    code = (
        "import torch\n"
        "from cifar_cli.budget.probe import measure_speed\n"
        "from cifar_cli.config.sections import ModelSettings, OptimSettings\n"
        "result = measure_speed(ModelSettings(name='airbench', width_multiplier=0.25), OptimSettings(name='muon'), 64,\n"
        "                   torch.device('cpu'), use_cache=False)\n"
        "print(torch.backends.cpu.get_cpu_capability(), result.precision, result.train_images_per_second)\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    capability, precision = done.stdout.split()[:2]
    if capability != "AVX2":
        pytest.skip(f"this CPU cannot be capped to AVX2 (capability {capability})")
    assert precision == "fp32", done.stdout


KEY_CHANGES = {
    "cpu model": lambda mp: mp.setattr(probe_module, "_cpu_model", lambda: "Another CPU"),
    "torch version": lambda mp: mp.setattr(torch, "__version__", "0.0.1"),
    "threads": lambda mp: mp.setattr(torch, "get_num_threads", lambda: 97),
    # Another cap than the one in force (the suite may itself run with the AVX2 kind emulated).
    "kernel caps": lambda mp: mp.setenv(
        "ONEDNN_MAX_CPU_ISA", "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") else "AVX2"
    ),
}
ARGUMENT_CHANGES = {
    "model": (ModelSettings(name="airbench", width_multiplier=0.25), ADAM, 128),
    "width": (ModelSettings(name="seed-cnn", width_multiplier=0.5), ADAM, 128),
    "optimiser": (SEED_CNN, OptimSettings(name="sgd"), 128),
    "batch size": (SEED_CNN, ADAM, 256),
}


@pytest.mark.parametrize("change", [*KEY_CHANGES, *ARGUMENT_CHANGES])
def test_a_cached_decision_holds_only_for_its_own_machine_and_recipe(
    fake_speeds, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: str
) -> None:
    """Each part of the cache key, changed alone, makes the next calibration measure again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = fake_speeds(AVX2_EPYC)
    assert measure_speed(SEED_CNN, ADAM, 128, CPU).cached is False
    assert measure_speed(SEED_CNN, ADAM, 128, CPU).cached is True  # unchanged: from the cache
    measured = len(calls)
    if change in KEY_CHANGES:
        KEY_CHANGES[change](monkeypatch)
        again = measure_speed(SEED_CNN, ADAM, 128, CPU)
    else:
        again = measure_speed(*ARGUMENT_CHANGES[change], CPU)
    assert again.cached is False and len(calls) > measured


def test_calibration_leaves_the_random_state_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    measure_speed(SEED_CNN, ADAM, 32, CPU, use_cache=False)
    assert torch.equal(torch.rand(3), expected)


def test_real_epochs_teach_the_cache_what_the_probe_got_wrong(fake_speeds, monkeypatch, tmp_path: Path) -> None:
    """A probe taken on a busy machine (here: a third of the speed) is replaced by the first real epoch, later
    epochs are averaged in, and the next run's plan starts from them."""
    from cifar_cli.budget.plan import RunPlan
    from cifar_cli.budget.probe import learn_from_epoch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fake_speeds({label: rate / 3 for label, rate in AVX2_EPYC.items()})
    busy = measure_speed(SEED_CNN, ADAM, 128, CPU)
    assert busy.step_seconds(128) == pytest.approx(128 / (130 / 3) + 0.01)
    learn_from_epoch(busy, 0.5, 2000.0)  # far from the probe's 2.96 s: replaced
    learn_from_epoch(busy, 0.7, 1000.0)  # near: averaged
    again = measure_speed(SEED_CNN, ADAM, 128, CPU)
    assert again.cached and again.learned_epochs == 2
    assert again.step_seconds(128) == pytest.approx(0.6) and again.eval_speed == pytest.approx(1500.0)
    assert again.step_seconds(256) != pytest.approx(0.6)  # another batch size: the probe's estimate
    assert "real epochs of earlier runs (2)" in again.summary()
    plan = RunPlan(8, 1.0, 128, 100, 5000, 0, again)
    assert plan.train_seconds_per_epoch == pytest.approx(60.0) and plan.val_seconds == pytest.approx(5000 / 1500)


def test_a_training_run_teaches_its_calibration(tmp_path: Path, prepared_dir: Path, monkeypatch) -> None:
    from cifar_cli.train.run import train
    from tests.conftest import tiny_settings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=3"))
    [entry] = json.loads((tmp_path / "cache" / "cifar" / "calibration.json").read_text()).values()
    assert entry["learned_epochs"] == 3 and entry["learned_step_seconds"] > 0
    steps = [record["seconds"] / record["steps"] for record in result.history]
    assert min(steps) / 2 <= entry["learned_step_seconds"] <= max(steps) * 2


def test_steps_short_of_the_batch_size_teach_the_cache_nothing(tmp_path: Path, prepared_dir: Path, monkeypatch) -> None:
    """Batches of 1,000 on the tiny data's few hundred images: every step is a fraction of the batch the key names,
    so its seconds would have a later run on the full data plan from far too fast a step."""
    from cifar_cli.train.run import train
    from tests.conftest import tiny_settings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=2", "train.batch_size=1000"))
    assert [record["steps"] for record in result.history] == [1, 1]
    [entry] = json.loads((tmp_path / "cache" / "cifar" / "calibration.json").read_text()).values()
    assert not entry.get("learned_epochs") and not entry.get("learned_step_seconds")


def test_bench_recalibrate_forgets_and_measures_again(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "calibration.json").write_text(json.dumps({"stale-a": {}, "stale-b": {}}))
    result = run_cli("bench", "--recalibrate", "--no-fast", "--model", "seed-cnn",
                                      "--batch-size", "16", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Forgot 2 cached calibration(s)." in result.output and "measured in" in result.output
    stored = json.loads((tmp_path / "cifar" / "calibration.json").read_text())
    assert len(stored) == 1 and '"seed-cnn"' in next(iter(stored))
