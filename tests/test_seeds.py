"""`cifar train --seeds`: several seeds of one recipe in one process, each a run of its own, then their mean."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.conftest import flat, run_cli


def _train(tmp_path: Path, prepared_dir: Path, *args: object):
    return run_cli("train", "--preset", "baseline", "--processed-dir", prepared_dir, "--device", "cpu",
                   "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "runs", "--progress", "plain",
                   "--set", "train.precision=fp32", *args)  # fmt: skip


def test_seeds_train_in_one_process_as_runs_of_their_own(tmp_path: Path, prepared_dir: Path) -> None:
    result = _train(tmp_path, prepared_dir, "--seeds", "0-1", "--epochs", "1")
    assert result.exit_code == 0, result.output
    [document] = (tmp_path / "runs").glob("seeds-*.json")
    summary = json.loads(document.read_text())
    assert summary["seeds"] == [0, 1]
    finals = [json.loads((tmp_path / "runs" / run["run_name"] / "final_metrics.json").read_text())
              for run in summary["runs"]]  # fmt: skip
    accuracies = [final["accuracy"] for final in finals]
    assert [run["accuracy"] for run in summary["runs"]] == accuracies
    assert summary["accuracy"]["mean"] == pytest.approx(statistics.fmean(accuracies))
    assert summary["accuracy"]["std"] == pytest.approx(statistics.stdev(accuracies))
    assert f"test accuracy {statistics.fmean(accuracies):.2%}" in flat(result.output)
    first, second = (run["run_name"] for run in summary["runs"])
    assert first != second and all((tmp_path / "ck" / name / "last.pth").is_file() for name in (first, second))
    # One seed resumed alone, as any run: the same command with --seed names the same run.
    alone = _train(tmp_path, prepared_dir, "--seed", "1", "--epochs", "2")
    assert alone.exit_code == 0 and f"Resuming run {second} after epoch 1" in flat(alone.output), alone.output
    # The seeds again, longer: seed 0 resumes for its second epoch, seed 1 is finished; both are in the table.
    again = _train(tmp_path, prepared_dir, "--seeds", "0-1", "--epochs", "2")
    assert again.exit_code == 0, again.output
    summary = json.loads(document.read_text())
    assert all(run["accuracy"] is not None for run in summary["runs"])
    histories = [json.loads((tmp_path / "runs" / name / "history.json").read_text()) for name in (first, second)]
    assert [len(history) for history in histories] == [2, 2]


def test_named_seeds_and_bad_seed_lists(tmp_path: Path, prepared_dir: Path) -> None:
    result = _train(tmp_path, prepared_dir, "--seeds", "0,3", "--epochs", "1", "--run-name", "mine")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["mine-seed0", "mine-seed3"]
    for bad in (["--seeds", "3-1"], ["--seeds", "a"], ["--seeds", "0,0"], ["--seeds", "0-1", "--seed", "2"],
                ["--seeds", "0-1", "--nproc", "2"], ["--seeds", "x", "--dry-run"]):  # fmt: skip
        refused = _train(tmp_path / "bad", prepared_dir, *bad, "--epochs", "1")
        assert refused.exit_code == 2 and "--seeds" in flat(refused.output), (bad, refused.output)


def test_ctrl_c_during_a_seed_says_to_run_the_same_seeds_command_again(tmp_path: Path, prepared_dir: Path) -> None:
    from cifar_cli.train.run import TrainingInterrupted, train
    from cifar_cli.train.seeds import train_seeds
    from tests.conftest import tiny_settings

    def train_one(settings):  # noqa: ANN001, ANN202 - seed 1 is stopped as Ctrl-C stops a run
        if settings.train.seed == 1:
            raise TrainingInterrupted("Interrupted. last.pth holds epoch 0.", hint="cifar train --run-name x")
        return train(settings)

    settings = tiny_settings(tmp_path, prepared_dir, "train.epochs=1", "train.run_name=ctrl-c")
    with pytest.raises(TrainingInterrupted) as stopped:
        train_seeds(settings, [0, 1, 2], train_one, lambda _text: None)
    assert "same --seeds command again" in stopped.value.hint
    assert (tmp_path / "checkpoints" / "ctrl-c-seed0" / "last.pth").is_file()
    assert not (tmp_path / "checkpoints" / "ctrl-c-seed2").exists()  # the rest wait for the next command
