"""What a run is and what it may read: no selection on the test split, run names that identify recipes, resumes
that refuse to mix two recipes, and choices validated before any work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_cli.config.settings import load_settings, parse_set_options, resolve_val_size
from cifar_cli.errors import SettingsError, UsageError
from cifar_cli.train.identity import default_run_name
from cifar_cli.train.run import train
from tests.conftest import run_cli, tiny_settings


def _settings(*assignments: str, preset: str = "baseline"):
    return load_settings(None, parse_set_options([f"preset={preset}", *assignments]))


def test_recipes_with_a_validation_monitor_hold_out_a_split_and_others_do_not() -> None:
    assert resolve_val_size(_settings(), 50_000) == 5_000  # baseline: plateau scheduler on val_accuracy
    assert resolve_val_size(_settings(preset="fast"), 50_000) == 0  # linear schedule: nothing to choose
    assert resolve_val_size(_settings(preset="fast-sgd"), 50_000) == 0
    early = _settings("train.early_stopping.patience=3", preset="fast")
    assert resolve_val_size(early, 50_000) == 5_000 and resolve_val_size(early, 100) == 10
    on_train = _settings("train.early_stopping.monitor=train_loss")  # plateau on a training metric
    assert resolve_val_size(on_train, 50_000) == 0
    assert resolve_val_size(_settings("data.val_size=123", preset="fast"), 50_000) == 123


def test_a_validation_monitor_without_a_validation_split_is_refused() -> None:
    with pytest.raises(SettingsError, match="needs a validation split") as raised:
        _settings("data.val_size=0")
    assert raised.value.rows[0][0] == "data.val_size"
    result = run_cli("train", "--preset", "fast", "--set", "train.early_stopping.patience=2",
                                 "--val-size", "0", "--dry-run")  # fmt: skip
    assert result.exit_code == 2 and "needs a validation split" in result.output


def test_without_a_monitor_nothing_is_held_out_and_no_best_checkpoint_exists(
    tmp_path: Path, prepared_dir: Path
) -> None:
    result = train(tiny_settings(tmp_path, prepared_dir, "scheduler.name=cosine", "train.epochs=2"))
    assert [p.name for p in result.checkpoint_dir.glob("*.pth")] == ["last.pth"]
    history = json.loads((result.run_dir / "history.json").read_text())
    # Each epoch's evaluation is labelled as what it is: the test split, shown for the curves, read by nothing.
    assert all("test_accuracy" in r and not any(k.startswith("val_") for k in r) for r in history)
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert final["split"] == "test" and "val_accuracy" not in final
    state = torch.load(result.checkpoint_dir / "last.pth", weights_only=True)
    assert state["settings"]["data"]["val_size"] == 0 and state["best_metric"] is None


def test_with_a_monitor_best_checkpoint_is_chosen_on_validation_and_test_is_read_once(
    tmp_path: Path, prepared_dir: Path
) -> None:
    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=2"))  # baseline: plateau
    assert sorted(p.name for p in result.checkpoint_dir.glob("*.pth")) == ["best.pth", "last.pth"]
    history = json.loads((result.run_dir / "history.json").read_text())
    assert all("val_accuracy" in r and not any(k.startswith("test_") for k in r) for r in history)
    best = torch.load(result.checkpoint_dir / "best.pth", weights_only=True)
    assert best["best_metric"] == max(r["val_accuracy"] for r in history[: best["epoch"]])
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert final["split"] == "test" and final["val_accuracy"] == history[-1]["val_accuracy"]
    assert best["settings"]["data"]["val_size"] == 10  # a tenth of the 100 tiny training images


@pytest.mark.parametrize(
    "change",
    ["train.lookahead=true", "train.micro_batch_size=8", "data.val_size=20", "optim.label_smoothing=0.1",
     "train.augment.cutout=4", "train.precision=bf16", "optim.name=sgd", "model.width_multiplier=0.5",
     "train.time_budget=5m"],
)  # fmt: skip
def test_every_setting_that_changes_the_result_names_another_run(change: str) -> None:
    assert default_run_name(_settings(change)) != default_run_name(_settings())


@pytest.mark.parametrize(
    "change",
    ["train.epochs=30", "train.device=cpu", "train.num_threads=1", "train.eval_batch_size=10", "train.tta=false",
     "log.progress=none", "data.processed_dir=/elsewhere", "train.compile=true", "train.tta_share=0.5"],
)  # fmt: skip
def test_length_and_machine_settings_keep_the_run_name(change: str) -> None:
    assert default_run_name(_settings(change)) == default_run_name(_settings())


def test_more_epochs_extend_the_same_default_named_run(tmp_path: Path, prepared_dir: Path) -> None:
    def settings(epochs: int):
        return tiny_settings(tmp_path, prepared_dir, f"train.epochs={epochs}", "train.run_name=null")

    first = train(settings(1))
    again = train(settings(2))
    assert again.run_name == first.run_name and again.resumed_from_epoch == 1
    assert [r["epoch"] for r in again.history] == [1, 2]


def test_resuming_with_another_optimizer_names_the_differences(tmp_path: Path, prepared_dir: Path) -> None:
    train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1"))  # adam, run name "tiny"
    with pytest.raises(UsageError, match="resuming it would mix two recipes") as raised:
        train(tiny_settings(tmp_path, prepared_dir, "train.epochs=2", "optim.name=sgd"))
    assert "optim.name: 'adam' in the run, 'sgd' now" in raised.value.message
    assert "--run-name" in raised.value.hint
    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=2", "optim.name=sgd", "train.resume=false"))
    assert result.resumed_from_epoch == 0  # --no-resume trains it again from scratch


def test_unknown_model_is_refused_before_any_download(tmp_path: Path) -> None:
    result = run_cli("train", "--model", "vgg", "--raw-dir", str(tmp_path / "raw"),
                                 "--processed-dir", str(tmp_path / "data"))  # fmt: skip
    assert result.exit_code == 2
    assert "model.name" in result.output and "seed-cnn" in result.output
    assert not (tmp_path / "raw").exists() and not (tmp_path / "data").exists()


def test_help_choices_come_from_the_code() -> None:
    from cifar_cli.config.settings import available_presets
    from cifar_cli.models import available_models

    result = run_cli("train", "--help", env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    for name in [*available_models(), *available_presets(), "adamw", "muon", "onecycle", "plateau"]:
        assert name in text, name


def test_nproc_on_an_absent_device_fails_before_launching(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("train", "--nproc", "2", "--device", "cuda", "--processed-dir", str(tmp_path))
    assert result.exit_code == 2
    assert "CUDA is not available" in result.output and "Launching" not in result.output


def test_nothing_to_train_writes_nothing(tmp_path: Path, prepared_dir: Path) -> None:
    first = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1", "scheduler.name=cosine"))
    before = sorted(p.name for p in first.run_dir.rglob("*"))
    again = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1", "scheduler.name=cosine"))
    assert again.final_metrics == {} and sorted(p.name for p in first.run_dir.rglob("*")) == before
