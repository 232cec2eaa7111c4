"""Faults done for real: kill -9 during training and during a checkpoint write, a full disk, bad inputs at the CLI."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cifar_cli.cli import app
from cifar_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from cifar_cli.errors import UsageError
from tests.conftest import batch_bytes, build_archive, make_images, py2_pickle

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def _epoch_of(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["epoch"]
    except Exception:  # not there yet, or being replaced right now
        return 0


def test_kill_9_mid_training_then_the_same_command_resumes(tmp_path: Path, prepared_dir: Path) -> None:
    command = [
        sys.executable, "-m", "cifar_cli", "train", "--preset", "baseline", "--epochs", "6", "--batch-size", "4",
        "--precision", "fp32", "--device", "cpu", "--run-name", "killed", "--progress", "plain",
        "--processed-dir", str(prepared_dir), "--checkpoint-dir", str(tmp_path / "ck"),
        "--log-dir", str(tmp_path / "runs"), "--set", "model.width_multiplier=2",
    ]  # fmt: skip
    last = tmp_path / "ck" / "killed" / "last.pth"
    process = subprocess.Popen(
        command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        _wait_for(lambda: _epoch_of(last) >= 2 or process.poll() is not None)
        os.kill(process.pid, signal.SIGKILL)  # somewhere in epoch 3 (or while saving it)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    finished_before = load_checkpoint(last)["epoch"]
    assert 2 <= finished_before < 6

    again = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Resuming run killed after epoch {finished_before}" in again.stdout
    history = json.loads((tmp_path / "runs" / "killed" / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate
    final = load_checkpoint(last)
    assert final["epoch"] == 6 and [r["epoch"] for r in final["history"]] == [1, 2, 3, 4, 5, 6]


WRITER = """
import sys, torch
from pathlib import Path
from cifar_cli.engine.checkpoint import save_checkpoint
save_checkpoint({"big": torch.zeros(400_000_000, dtype=torch.uint8)}, Path(sys.argv[1]))
"""


def test_kill_9_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1, "weights": torch.arange(10)}, path)
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=ENV)
    try:
        _wait_for(lambda: any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()))
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(10))


def test_full_disk_is_reported_before_training(tmp_path: Path, prepared_dir: Path, monkeypatch) -> None:
    from cifar_cli.engine.train import train
    from tests.conftest import tiny_settings

    original = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        if self.name == ".write-test":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(UsageError, match="No space left on device"):
        train(tiny_settings(tmp_path, prepared_dir))
    assert not (tmp_path / "runs" / "tiny" / "history.json").exists()


runner = CliRunner()


def _archive_with(tmp_path: Path, **options) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    build_archive(raw / "cifar-10-python.tar.gz", **options)
    return raw


def _bad_archives(tmp_path: Path) -> dict[str, Path]:
    data, labels = make_images(10, seed=3)
    labels[0] = 10
    empty = tmp_path / "empty" / "raw"
    empty.mkdir(parents=True)
    import tarfile

    with tarfile.open(empty / "cifar-10-python.tar.gz", "w:gz"):
        pass
    return {
        "empty archive": empty,
        "missing batch": _archive_with(tmp_path / "a", overrides={"data_batch_2": None}),
        "wrong shape": _archive_with(
            tmp_path / "b", overrides={"data_batch_1": py2_pickle({b"data": data[:, :100]})}
        ),
        "label out of range": _archive_with(
            tmp_path / "c", overrides={"test_batch": batch_bytes(data, labels, "t")}
        ),
    }


def test_bad_archives_exit_2_with_one_screen_message(tmp_path: Path) -> None:
    for case, raw in _bad_archives(tmp_path).items():
        result = runner.invoke(
            app, ["prepare", "--raw-dir", str(raw), "--processed-dir", str(tmp_path / "out")]
        )
        assert result.exit_code == 2, (case, result.output)
        assert "Traceback" not in result.output and len(result.output.splitlines()) < 15, case


@pytest.mark.parametrize(
    "args",
    [
        ["download", "--raw-dir", "{file}", "--url", "{file}"],
        ["prepare", "--processed-dir", "{file}", "--raw-dir", "{folder}"],
        ["train", "--checkpoint-dir", "{file}", "--processed-dir", "{folder}"],
        ["train", "--log-dir", "{file}", "--processed-dir", "{folder}"],
        ["train", "--processed-dir", "{file}"],
        ["evaluate", "{folder}"],
        ["evaluate", "{missing}"],
        ["plot", "{missing}"],
        ["train", "--config", "{missing}"],
        ["train", "--config", "{folder}"],
        ["predict", "{missing}", "{file}"],
    ],
)
def test_paths_that_do_not_exist_or_are_files(tmp_path: Path, args: list[str]) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    names = {"file": str(a_file), "folder": str(tmp_path), "missing": str(tmp_path / "missing")}
    result = runner.invoke(app, [arg.format(**names) for arg in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--epochs", "1.5"],
        ["train", "--batch-size", "x"],
        ["train", "--lr", "-1"],
        ["train", "--wd", "abc"],
        ["train", "--seed", "-3"],
        ["train", "--precision", "fp8"],
        ["train", "--scheduler", "exotic"],
        ["train", "--val-size", "ten"],
        ["train", "--resume", "maybe"],
        ["train", "--label-smoothing", "1.5"],
        ["evaluate", "x.pth", "--batch-size", "0"],
        ["predict", "x.pth", "y.png", "--top-k", "20"],
        ["bench", "--batches", "0"],
        ["bench", "--min-seconds", "-1"],
        ["download", "--md5", "not-hex"],
    ],
)
def test_flags_with_wrong_values_exit_2(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
