"""`cifar sweep`: grids and random draws of ordinary runs, ranked on validation accuracy, resumable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifar_cli.cli import app
from cifar_cli.errors import SettingsError
from cifar_cli.sweep import parse_axis, plan_trials

runner = CliRunner()


def test_axis_syntax() -> None:
    assert parse_axis("optim.lr=0.5,1.0,2") == ("optim.lr", [0.5, 1.0, 2])
    assert parse_axis("train.batch_size=range(256, 1024, 256)") == ("train.batch_size", [256, 512, 768])
    assert parse_axis("optim.lr=log(0.001,0.1,3)") == ("optim.lr", [0.001, 0.01, 0.1])
    assert parse_axis("optim.name=sgd,adam") == ("optim.name", ["sgd", "adam"])
    for bad in ("optim.lr", "optim.lr=range(1,1)", "optim.lr=log(0,1,3)", "optim.lr=range(a,b)"):
        with pytest.raises(SettingsError):
            parse_axis(bad)


def test_grid_times_seeds_and_seeded_random_draws() -> None:
    axes = [("optim.lr", [0.1, 0.2, 0.3]), ("optim.momentum", [0.8, 0.9])]
    grid = plan_trials(axes, [0, 1], None)
    assert len(grid) == 12 and len({t.name for t in grid}) == 12
    assert grid[0].values == {"optim.lr": 0.1, "optim.momentum": 0.8, "train.seed": 0}
    assert grid[0].name == "t000_lr0.1_momentum0.8_seed0" and grid[0].varied == ("optim.lr", "optim.momentum")
    drawn = plan_trials(axes, [0], samples=4, seed=7)
    assert len(drawn) == 4 and drawn == plan_trials(axes, [0], samples=4, seed=7)
    assert {tuple(t.values.items()) for t in drawn} <= {
        tuple(t.values.items()) for t in plan_trials(axes, [0], None)
    }


def _sweep(tmp_path: Path, prepared_dir: Path, *extra: str) -> list[str]:
    return [
        "sweep", "--preset", "baseline", "--set", "optim.lr=0.001,0.003", "--seeds", "0,1", "--epochs", "1",
        "--device", "cpu", "--name", "lr", "--processed-dir", str(prepared_dir),
        "--log-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ck"),
        "--set", "train.batch_size=16", "--set", "train.precision=fp32", "--set", "train.num_threads=1",
        "--set", "log.progress=none", "--set", "train.channels_last=true", *extra,
    ]  # fmt: skip


def test_sweep_ranks_on_validation_survives_ctrl_c_and_resumes(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cifar_cli.engine import train as train_module

    real_train, calls = train_module.train, []

    def interrupted_on_the_third(settings, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(settings.train.run_name)
        if len(calls) == 3:
            raise train_module.TrainingInterrupted("Interrupted.", hint="run the same command")
        return real_train(settings, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", interrupted_on_the_third)
    first = runner.invoke(app, _sweep(tmp_path, prepared_dir))
    assert first.exit_code == 130, first.output
    monkeypatch.setattr(train_module, "train", real_train)
    again = runner.invoke(app, _sweep(tmp_path, prepared_dir))
    assert again.exit_code == 0, again.output
    assert again.output.count("finished before, skipped") == 2

    folder = tmp_path / "runs" / "sweeps" / "lr"
    document = json.loads((folder / "sweep.json").read_text())
    means = [r["val_accuracy_mean"] for r in document["recipes"]]
    assert len(means) == 2 and means == sorted(means, reverse=True)
    assert document["chosen"] == {"optim.lr": document["recipes"][0]["optim.lr"]}
    assert document["ranked_by"].startswith("validation")
    with (folder / "sweep.csv").open() as handle:
        assert [row["seeds"] for row in csv.DictReader(handle)] == ["2", "2"]
    assert (folder / "sweep.png").stat().st_size > 10_000
    trials = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert len(trials) == 4 and all((folder / t / "final_metrics.json").is_file() for t in trials)
    assert "Its test accuracy, reported once" in again.output

    # TensorBoard's own reader finds every trial in the HParams plugin, with the swept setting.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    swept = set()
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for content in accumulator.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                swept.add(data.session_start_info.hparams["optim.lr"].number_value)
    assert swept == {0.001, 0.003}


def test_bad_values_are_refused_before_the_first_trial(tmp_path: Path, prepared_dir: Path) -> None:
    args = _sweep(tmp_path, prepared_dir)
    args[args.index("optim.lr=0.001,0.003")] = "optim.lr=0.001,-1"
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "optim.lr" in result.output
    assert not (tmp_path / "runs").exists()
