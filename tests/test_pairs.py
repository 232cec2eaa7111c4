"""Features that meet: every pair of training features on tiny data either trains or is refused before training
with a sentence (a CifarError of exit 2), never an unexpected error. docs/guide.md's table of what combines with
what says the same; `test_the_guide_table_matches` keeps the two in step."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from cifar_cli.errors import CifarError, ExitCode
from tests.conftest import flat, run_cli, tiny_settings


@dataclass(frozen=True)
class Feature:
    name: str
    settings: tuple[str, ...] = ()
    group: str = ""  # features of one group are alternatives (one teacher), never paired with each other


# What each feature sets on top of a 1-epoch run of the baseline's network at a quarter width. `{ckpt}`, `{onnx}`
# `{pt2}` and `{source}` are filled with the session's teacher and fine-tuning source (`pair_files`).
FEATURES = (
    Feature("time budget", ("train.time_budget=60s",), "budget"),
    Feature("ladder", ("train.time_budget=60s", "preset=null"), "budget"),
    Feature(
        "small-image epochs",
        ("model.name=airbench", "train.low_res.size=16", "train.low_res.epochs=1", "train.low_res.scope=always"),
    ),  # fmt: skip
    Feature("teacher checkpoint", ("train.distill.teacher={ckpt}",), "teacher"),
    Feature("teacher ONNX", ("train.distill.teacher={onnx}",), "teacher"),
    Feature("teacher .pt2", ("train.distill.teacher={pt2}",), "teacher"),
    Feature("EMA", ("train.ema.half_life_steps=2",)),
    Feature("mixup/cutmix", ("train.augment.mixup=0.5", "train.augment.cutmix=1.0")),
    Feature("lookahead", ("train.lookahead=true",)),
    Feature("calibration", ("train.calibrate=true",)),
    Feature("init-from, frozen", ("train.init_from={source}", "train.freeze_epochs=1")),
    Feature("class weights", ("train.class_weights=auto",)),
    Feature("balanced sampler", ("train.balanced_sampler=true",)),
    Feature("resume", ()),  # the same run again with one epoch more, then once more unchanged
)
PAIRS = [
    (first, second)
    for first, second in itertools.combinations(FEATURES, 2)
    if not (first.group and first.group == second.group)
]


@pytest.fixture(scope="session")
def pair_files(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Path]:
    """A seed-cnn checkpoint as a teacher (and its ONNX and .pt2 exports), and fine-tuning sources of both
    networks the pairs train (a source trains the network its weights came from)."""
    from cifar_cli.train.run import train

    folder = tmp_path_factory.mktemp("pair-files")
    files: dict[str, Path] = {}
    for model in ("seed-cnn", "airbench"):
        settings = tiny_settings(folder, prepared_dir, "train.epochs=1", f"model.name={model}",
                                 "model.width_multiplier=0.25", f"train.run_name={model}")  # fmt: skip
        files[model] = train(settings).checkpoint_dir / "last.pth"
    files["ckpt"] = files["seed-cnn"]
    for fmt in ("onnx", "pt2"):
        files[fmt] = folder / f"teacher.{fmt}"
        result = run_cli("export", files["ckpt"], "--format", fmt, "--out", files[fmt], "--processed-dir", prepared_dir)
        assert result.exit_code == 0, result.output
    return files


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pairs' cache of measured speeds: the ladder's probes are measured once, and what the fake clock
    teaches stays out of the suite's own cache."""
    return tmp_path_factory.mktemp("pair-cache")


def _assignments(features: tuple[Feature, ...], files: dict[str, Path]) -> list[str]:
    settings = ["train.epochs=1", "model.width_multiplier=0.25", "train.run_name=pair"]
    for feature in features:
        settings += list(feature.settings)
    # The network trained: airbench where named, or where no preset is (`fast`, the default); else the baseline's.
    model = "airbench" if {"model.name=airbench", "preset=null"} & set(settings) else "seed-cnn"
    values = {"ckpt": files["ckpt"], "onnx": files.get("onnx"), "pt2": files.get("pt2"), "source": files[model]}
    return [assignment.format(**values) for assignment in settings]


class FakeClock:
    """Seconds for a budget run: a millisecond a reading and STEP_SECONDS an optimiser step (the tiny steps take
    microseconds), so that a minute's budget plans and re-plans a handful of epochs in a second of real time."""

    STEP_SECONDS = 1.0

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def train_or_refuse(tmp_path: Path, prepared_dir: Path, assignments: list[str]) -> str:
    """'trained', or the sentence of a refusal before training (exit 2); anything else fails the test. A budget
    run keeps its budget on a fake clock."""
    from cifar_cli.train.loop import EpochRunner
    from cifar_cli.train.run import Trainer

    preset = next((a.split("=", 1)[1] for a in assignments if a.startswith("preset=")), "baseline")
    rest = [a for a in assignments if not a.startswith("preset=")]
    clock = FakeClock()
    real_step = EpochRunner._step

    def timed_step(self, images, targets):  # noqa: ANN001, ANN202
        clock.now += FakeClock.STEP_SECONDS
        return real_step(self, images, targets)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(EpochRunner, "_step", timed_step)
            Trainer(tiny_settings(tmp_path, prepared_dir, *rest, preset=preset), clock=clock).run()
    except CifarError as error:
        assert error.exit_code == ExitCode.USAGE, f"{type(error).__name__}: {error}"
        return error.message
    return "trained"


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a.name} + {b.name}" for a, b in PAIRS])
def test_a_pair_trains_or_is_refused_with_a_sentence(
    tmp_path: Path,
    prepared_dir: Path,
    pair_files: dict[str, Path],
    first: Feature,
    second: Feature,
    monkeypatch: pytest.MonkeyPatch,
    pair_cache: Path,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(pair_cache))
    assignments = _assignments((first, second), pair_files)
    outcome = train_or_refuse(tmp_path, prepared_dir, assignments)
    if "resume" in (first.name, second.name) and outcome == "trained":
        longer = [re.sub(r"^train\.epochs=1$", "train.epochs=2", a) for a in assignments]
        for again in (longer, longer):  # extended by an epoch, then the same command on a finished run
            assert train_or_refuse(tmp_path, prepared_dir, again) == "trained"
    assert outcome in ("trained", *REFUSED.get(frozenset((first.name, second.name)), ())), outcome


# The pairs refused on purpose, with the start of their sentence.
REFUSED: dict[frozenset[str], tuple[str, ...]] = {}


@pytest.mark.parametrize(
    ("model", "size", "reason"),
    [("seed-cnn", 16, "it takes 32 x 32 images only"), ("airbench", 8, "its pooling stages run out of pixels")],
)
def test_small_image_epochs_a_model_cannot_take_are_refused_before_any_timing(
    tmp_path: Path, prepared_dir: Path, model: str, size: int, reason: str
) -> None:
    """Once "Unexpected error: RuntimeError: mat1 and mat2 shapes cannot be multiplied", after the probe."""
    small = ("--set", f"train.low_res.size={size}", "--set", "train.low_res.epochs=1", "--set",
             "train.low_res.scope=always")  # fmt: skip
    for dry_run in ((), ("--dry-run",)):
        result = run_cli("train", "--model", model, "--epochs", "1", "--processed-dir", prepared_dir, "--device", "cpu",
                         "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "runs", *small, *dry_run)  # fmt: skip
        assert result.exit_code == 2 and reason in flat(result.output), result.output
        assert "measured" not in flat(result.output).lower()  # refused before the speed probe
    assert not list((tmp_path / "ck").rglob("*.pth"))


@pytest.mark.parametrize(
    "feature", [f for f in FEATURES if f.group != "budget" and f.name != "resume"], ids=lambda f: f.name
)
def test_a_sweep_trial_meets_each_feature(
    tmp_path: Path, prepared_dir: Path, pair_files: dict[str, Path], feature: Feature
) -> None:
    """Each feature as a sweep's fixed setting, two trials (seeds); the same sweep again ends 0 as well."""
    assignments = [a for a in _assignments((feature,), pair_files) if not a.startswith("train.run_name=")]
    fixed = [part for assignment in assignments for part in ("--set", assignment)]
    for _ in range(2):
        result = run_cli("sweep", "--preset", "baseline", *fixed, "--set", "train.batch_size=16,32",
                         "--name", "pairs", "--processed-dir", prepared_dir, "--device", "cpu",
                         "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "runs",
                         env={"CIFAR_LOG__PROGRESS": "none", "CIFAR_TRAIN__PRECISION": "fp32"})  # fmt: skip
        assert result.exit_code == 0, result.output


TWO_PROCESS_GROUPS = {
    # Every feature of the matrix that one run can hold beside two processes, in two runs: each pair with two
    # processes is met (a budget's clock cannot be faked in other processes: its pairs are in docs/guide.md).
    "teacher, EMA, mixing, lookahead, calibration, class weights": (
        "train.distill.teacher={onnx}", "train.ema.half_life_steps=2", "train.augment.mixup=0.5",
        "train.augment.cutmix=1.0", "train.lookahead=true", "train.calibrate=true", "train.class_weights=auto"),
    "small-image epochs, init-from frozen, balanced sampler, checkpoint teacher": (
        "model.name=airbench", "train.low_res.size=16", "train.low_res.epochs=1", "train.low_res.scope=always",
        "train.init_from={source}", "train.freeze_epochs=1", "train.balanced_sampler=true",
        "train.distill.teacher={ckpt}"),
}  # fmt: skip


@pytest.mark.parametrize("group", list(TWO_PROCESS_GROUPS))
def test_two_processes_meet_the_other_features_and_resume(
    tmp_path: Path, prepared_dir: Path, pair_files: dict[str, Path], group: str
) -> None:
    import os
    import subprocess
    import sys

    features = (Feature(group, TWO_PROCESS_GROUPS[group]),)
    assignments = [a for a in _assignments(features, pair_files) if not a.startswith("train.epochs=")]
    sets = [part for assignment in assignments for part in ("--set", assignment)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    for epochs in ("1", "2"):  # trained, then resumed for one epoch more
        command = [sys.executable, "-m", "cifar_cli", "train", "--nproc", "2", "--preset", "baseline", "--epochs",
                   epochs, "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--val-size", "10",
                   "--processed-dir", str(prepared_dir), "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir",
                   str(tmp_path / "runs"), "--progress", "plain", "--set", "train.num_threads=1", *sets]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Resuming run pair after epoch 1" in done.stdout
