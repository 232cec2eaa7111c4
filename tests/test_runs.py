"""`cifar runs`: what a log folder holds, from the files each run leaves behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from cifar_cli.runs import list_runs
from cifar_cli.train.run import train
from tests.conftest import run_cli, tiny_settings


def test_runs_lists_states_and_the_settings_that_differ(tmp_path: Path, prepared_dir: Path) -> None:
    for lr in ("0.001", "0.003"):
        train(tiny_settings(tmp_path, prepared_dir, f"optim.lr={lr}", "train.epochs=1", "train.run_name=null"))
    log_dir = tmp_path / "runs"
    first, second = sorted(log_dir.iterdir())
    interrupted = log_dir / "interrupted"
    shutil.copytree(first, interrupted)
    (interrupted / "final_metrics.json").unlink()  # stopped before its final evaluation
    running = log_dir / "running"
    shutil.copytree(second, running)
    (running / ".lock").write_text(f"process {os.getpid()} on {socket.gethostname()} since now\n")

    found = {run.name: run for run in list_runs(log_dir)}
    assert found[first.name].state == "finished" and found["interrupted"].state == "interrupted"
    assert found["running"].state == "running"
    assert {tuple(run.differing) for run in found.values()} == {("optim.lr",)}
    assert found[first.name].differing["optim.lr"] != found[second.name].differing["optim.lr"]
    final = json.loads((first / "final_metrics.json").read_text())
    assert found[first.name].test_accuracy == final["accuracy"] and found[first.name].epochs_done == 1
    assert found[first.name].val_accuracy is not None  # baseline holds out a validation split

    result = run_cli("runs", "--log-dir", str(log_dir), "--sort", "test_accuracy", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    accuracies = [run["test_accuracy"] for run in listed if run["test_accuracy"] is not None]
    assert accuracies == sorted(accuracies, reverse=True) and listed[-1]["name"] == "interrupted"
    table = run_cli("runs", "--log-dir", str(log_dir), env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "interrupted" in table.output and "lr=0.003" in table.output


def test_runs_errors_are_clear(tmp_path: Path) -> None:
    assert run_cli("runs", "--log-dir", str(tmp_path / "none")).exit_code == 2
    assert run_cli("runs", "--log-dir", str(tmp_path), "--sort", "colour").exit_code == 2
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "history.json").write_text("{oops")
    result = run_cli("runs", "--log-dir", str(tmp_path))
    assert result.exit_code == 2 and "damaged" in result.output
