from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_cli import files as files_module
from cifar_cli.checkpoint import load_checkpoint
from cifar_cli.config.sections import DataSettings
from cifar_cli.errors import CifarError, UsageError
from cifar_cli.train.identity import default_run_name
from cifar_cli.train.run import Trainer, TrainingInterrupted, train
from cifar_cli.train.setup import load_splits
from cifar_cli.train.tracking import NullReporter
from tests.conftest import assert_same_weights, tiny_settings


def test_run_writes_history_tensorboard_settings_and_checkpoints(tmp_path: Path, prepared_dir: Path) -> None:
    result = train(tiny_settings(tmp_path, prepared_dir))
    history = json.loads((result.run_dir / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    for key in ("train_loss", "val_loss", "val_accuracy", "val_f1", "lr", "seconds"):
        assert key in history[0]
    assert list(result.run_dir.glob("events.out.tfevents*"))
    assert "seed-cnn" in (result.run_dir / "settings.yaml").read_text()
    state = torch.load(result.checkpoint_dir / "last.pth", weights_only=True)
    assert state["epoch"] == 2 and state["format_version"] == 1 and state["settings"]["train"]["epochs"] == 2
    assert (result.checkpoint_dir / "best.pth").is_file()
    # The span the speed record times: init (whitening), the training steps, the final evaluation; seconds.
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert final["init_seconds"] > 0 and final["final_eval_seconds"] > 0
    assert final["train_seconds"] == pytest.approx(sum(record["seconds"] for record in history))
    assert final["record_span_seconds"] == pytest.approx(
        final["init_seconds"] + final["train_seconds"] + final["final_eval_seconds"]
    )
    assert final["record_span_seconds"] < final["wall_seconds"]


def test_tensorboard_scalars_are_grouped(tmp_path: Path, prepared_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1"))
    tags = set()
    for events in result.run_dir.glob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"loss/train", "loss/val", "accuracy/val", "f1/val", "lr"} <= tags


class InterruptAfterFirstEpoch(NullReporter):
    """Presses Ctrl-C once the first epoch has been checkpointed."""

    def end_epoch(self, record: dict) -> None:
        if record["epoch"] == 1:
            raise KeyboardInterrupt


def _interrupted_then_resumed(folder: Path, prepared: Path, *extra: str, preset: str):
    with pytest.raises(TrainingInterrupted) as interrupted:
        train(tiny_settings(folder, prepared, *extra, preset=preset), InterruptAfterFirstEpoch())
    assert interrupted.value.exit_code == 130 and "--run-name tiny" in interrupted.value.hint
    return train(tiny_settings(folder, prepared, *extra, preset=preset))


@pytest.mark.parametrize(
    ("preset", "extra"),
    [
        ("baseline", ()),
        ("fast", ()),
        ("fast", ("train.micro_batch_size=5",)),  # chunks of 5, 5, 5 and 1
        ("fast", ("train.lookahead=true", "train.augment.alternate_flip=true", "model.whiten_bias_epochs=1")),
        ("fast-sgd", ()),
        ("resnet18", ("train.augment.cutout=4",)),
        # The moving average and the mixing draws continue where they stopped.
        ("fast", ("train.ema.half_life_steps=3", "train.augment.mixup=0.4", "train.augment.cutmix=1.0")),
    ],
)
def test_resume_gives_identical_weights(tmp_path: Path, prepared_dir: Path, preset: str, extra: tuple) -> None:
    extra = ("model.width_multiplier=0.25", "train.precision=fp32", "train.epochs=3", *extra)
    straight = train(tiny_settings(tmp_path / "a", prepared_dir, *extra, preset=preset))
    resumed = _interrupted_then_resumed(tmp_path / "b", prepared_dir, *extra, preset=preset)
    assert resumed.resumed_from_epoch == 1
    a, b = assert_same_weights(straight.checkpoint_dir / "last.pth", resumed.checkpoint_dir / "last.pth")
    assert [r["epoch"] for r in b["history"]] == [1, 2, 3]
    assert a["history"][2]["train_loss"] == b["history"][2]["train_loss"]


def test_extending_a_finished_run_stretches_the_schedule(tmp_path: Path, prepared_dir: Path) -> None:
    for scheduler in ("linear", "onecycle"):
        folder = tmp_path / scheduler
        train(tiny_settings(folder, prepared_dir, f"scheduler.name={scheduler}", "train.epochs=1"))
        longer = train(tiny_settings(folder, prepared_dir, f"scheduler.name={scheduler}", "train.epochs=3"))
        assert [r["epoch"] for r in longer.history] == [1, 2, 3]
        assert longer.history[1]["lr"] > 0  # not stuck at the end of the old 1-epoch schedule


def test_no_resume_starts_again(tmp_path: Path, prepared_dir: Path) -> None:
    train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1"))
    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1", "train.resume=false"))
    assert result.resumed_from_epoch == 0 and len(result.history) == 1


def test_resume_requested_without_checkpoint(tmp_path: Path, prepared_dir: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        train(tiny_settings(tmp_path, prepared_dir, "train.resume=true"))


def test_early_stopping(tmp_path: Path, prepared_dir: Path) -> None:
    # lr so small that Adam's steps vanish below float32 rounding and seed-cnn has no BatchNorm statistics: the
    # validation loss of epoch 2 equals epoch 1's exactly, so patience 1 stops at epoch 2 of 6, not later.
    settings = tiny_settings(
        tmp_path,
        prepared_dir,
        "train.epochs=6",
        "optim.lr=1e-12",
        "train.early_stopping.patience=1",
        "train.early_stopping.monitor=val_loss",
        "train.early_stopping.mode=min",
        "scheduler.name=none",
    )
    result = train(settings)
    assert result.stopped_early and len(result.history) == 2
    assert result.history[1]["val_loss"] == result.history[0]["val_loss"]


def test_crash_during_save_leaves_previous_checkpoint(tmp_path: Path, prepared_dir: Path, monkeypatch) -> None:
    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1"))
    last = result.checkpoint_dir / "last.pth"
    before = last.read_bytes()

    def crash(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module.os, "fsync", crash)  # where a full disk fails a write: mid-file
    with pytest.raises(CifarError, match="No space left on device"):
        train(tiny_settings(tmp_path, prepared_dir, "train.epochs=2"))
    assert last.read_bytes() == before
    assert load_checkpoint(last)["epoch"] == 1
    assert not [p for p in result.checkpoint_dir.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_while_a_checkpoint_is_built_saves_it_then_stops(
    tmp_path: Path, prepared_dir: Path, monkeypatch
) -> None:
    """SIGINT that lands while the checkpoint's state is put together (inside pydantic's serialiser it would come out
    as a PydanticSerializationError and a traceback) waits for the save: last.pth holds epoch 1, then exit 130."""
    import os
    import signal
    import time

    from cifar_cli.train import state as run_state

    real_state = run_state.checkpoint_state

    def interrupted_state(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # Python runs the handler here, between bytecodes, unless it is deferred
        return real_state(*args, **kwargs)

    monkeypatch.setattr(run_state, "checkpoint_state", interrupted_state)
    with pytest.raises(TrainingInterrupted) as interrupted:
        train(tiny_settings(tmp_path, prepared_dir, "train.epochs=2"))
    assert interrupted.value.exit_code == 130 and "holds epoch 1 of run tiny" in str(interrupted.value)
    assert load_checkpoint(tmp_path / "checkpoints" / "tiny" / "last.pth")["epoch"] == 1


def test_absent_device_is_a_usage_error(tmp_path: Path, prepared_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="CUDA is not available"):
        train(tiny_settings(tmp_path, prepared_dir, "train.device=cuda"))


def test_nan_loss_stops_with_a_clear_error(tmp_path: Path, prepared_dir: Path) -> None:
    with pytest.raises(CifarError, match="loss became nan"):
        train(tiny_settings(tmp_path, prepared_dir, "optim.lr=1e30", "optim.name=sgd", "scheduler.name=none"))


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path: Path, prepared_dir: Path) -> None:
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(UsageError, match="Cannot write to .*checkpoints"):
        train(tiny_settings(tmp_path, prepared_dir))
    assert not (tmp_path / "runs").exists()


def test_validation_split_and_bf16(tmp_path: Path, prepared_dir: Path) -> None:
    trainer = Trainer(
        tiny_settings(tmp_path, prepared_dir, "data.val_size=20", "train.precision=bf16", "train.epochs=1")
    )
    calls: list[torch.dtype] = []
    original = torch.nn.Linear.forward

    def spy(self, x):  # noqa: ANN001, ANN202 - records the dtype the head really computes in
        out = original(self, x)
        calls.append(out.dtype)
        return out

    torch.nn.Linear.forward = spy
    try:
        result = trainer.run()
    finally:
        torch.nn.Linear.forward = original
    assert len(trainer.loaders.evaluation.labels) == 20 and len(trainer.loaders.train.labels) == 80
    assert calls and set(calls) == {torch.bfloat16}  # training and evaluation both ran in bf16
    correct = result.history[0]["val_accuracy"] * 20
    assert abs(correct - round(correct)) < 1e-6  # a fraction of the 20 validation images


def test_same_recipe_same_run_name(tmp_path: Path, prepared_dir: Path) -> None:
    a = tiny_settings(tmp_path, prepared_dir, "train.run_name=null")
    b = tiny_settings(tmp_path, prepared_dir, "train.run_name=null", "train.device=auto")
    c = tiny_settings(tmp_path, prepared_dir, "train.run_name=null", "optim.lr=0.5")
    assert default_run_name(a) == default_run_name(b) != default_run_name(c)
    assert default_run_name(a).startswith("baseline-seed-cnn-")


def test_an_early_stopped_run_ends_on_lookahead_s_averaged_weights(tmp_path: Path, prepared_dir: Path) -> None:
    """Early stopping ends the run before its planned last epoch: the weights kept are still the averaged ones."""
    from tests.test_budget import assert_ends_on_the_average

    # train_loss "improving" upwards never happens while the model learns: the run stops after epoch 2 of 20.
    settings = tiny_settings(tmp_path, prepared_dir, "train.lookahead=true", "train.epochs=20", "train.batch_size=32",
                             "train.early_stopping.patience=1", "train.early_stopping.monitor=train_loss",
                             "train.early_stopping.mode=max")  # fmt: skip
    result = train(settings)
    assert result.stopped_early and len(result.history) == 2
    assert_ends_on_the_average(result.checkpoint_dir / "last.pth")


def test_lookahead_moves_weights_towards_their_average() -> None:
    from cifar_cli.recipe.lookahead import Lookahead

    model = torch.nn.Linear(2, 2)
    lookahead = Lookahead(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.sync(model, decay=0.75)
    assert torch.allclose(model.weight, start + 0.25)  # a quarter of the way from the average
    assert Lookahead.decay(0, 100) == 0 and Lookahead.decay(100, 100) == pytest.approx(0.95**5)


def test_checkpoints_results_and_exports_say_what_made_them(tmp_path: Path, prepared_dir: Path) -> None:
    import platform
    import subprocess

    from cifar_cli import __version__
    from cifar_cli.config.sections import DataSettings
    from cifar_cli.export.writer import export_checkpoint
    from cifar_cli.train.identity import provenance

    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    provenance.cache_clear()  # read once per process: a commit made while the suite runs would be missed
    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1"))
    made_by = load_checkpoint(result.checkpoint_dir / "last.pth")["made_by"]
    assert made_by["cifar_cli"] == __version__ and made_by["torch"] == torch.__version__
    assert made_by["python"] == platform.python_version()
    if (repo / ".git").exists() and head.returncode == 0:  # run from a checkout: its commit, "-dirty" if edited
        assert made_by["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert final["made_by"] == made_by
    exported = export_checkpoint(
        result.checkpoint_dir / "last.pth", DataSettings(processed_dir=prepared_dir), "pt2", tmp_path / "m.pt2"
    )
    assert exported.contract["made_by"] == made_by and exported.contract["checkpoint_made_by"] == made_by


def test_a_training_subset_keeps_the_validation_split(prepared_dir: Path) -> None:
    """data.train_subset trains on a balanced part of what the validation split leaves, the validation images
    unchanged; without a validation split, a balanced part of all training images."""
    full = load_splits(DataSettings(processed_dir=prepared_dir, val_size=20), lambda _: 20, seed=3)
    part = load_splits(DataSettings(processed_dir=prepared_dir, val_size=20, train_subset=40), lambda _: 20, seed=3)
    assert torch.equal(full.evaluation[0], part.evaluation[0])
    assert len(part.train[1]) == 40 and torch.bincount(part.train[1]).tolist() == [4] * 10
    held_out = {bytes(image.flatten().tolist()) for image in part.evaluation[0]}
    assert not any(bytes(image.flatten().tolist()) in held_out for image in part.train[0])  # none of them trains
    alone = load_splits(DataSettings(processed_dir=prepared_dir, val_size=0, train_subset=30), lambda _: 0, seed=3)
    assert len(alone.train[1]) == 30 and alone.epoch_split == "test"


def test_low_resolution_epochs_train_the_airbench_network_then_full_size(tmp_path: Path, prepared_dir: Path) -> None:
    """The globally pooled network trains on 16-pixel images first, then full size (budgets: test_budget.py);
    with `scope: cpu_budget` a fixed number of epochs trains full size throughout."""
    from cifar_cli.models.airbench import AirbenchNet

    low_res = ("model.name=airbench", "train.low_res.size=16", "train.low_res.epochs=1", "train.epochs=2")
    trainer = Trainer(tiny_settings(tmp_path, prepared_dir, *low_res))
    sizes: list[int] = []
    original = AirbenchNet.forward

    def spy(self, x):  # noqa: ANN001, ANN202 - the side of the images the network trains on
        if self.training:
            sizes.append(x.shape[-1])
        return original(self, x)

    AirbenchNet.forward = spy
    try:
        result = trainer.run()
        steps = len(trainer.loaders.train)  # after the planner's timed steps: the two epochs
        assert sizes[-2 * steps :] == [16] * steps + [32] * steps
        assert len(result.history) == 2
        sizes.clear()
        budget_only = (*low_res, "train.low_res.scope=cpu_budget", "train.run_name=budget-only")
        Trainer(tiny_settings(tmp_path, prepared_dir, *budget_only)).run()
        assert sizes[-2 * steps :] == [32] * (2 * steps) and 16 not in sizes  # not even timed
    finally:
        AirbenchNet.forward = original
