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

from cifar_cli.checkpoint import load_checkpoint, save_checkpoint
from cifar_cli.errors import UsageError
from tests.conftest import batch_bytes, build_archive, flat, make_images, py2_pickle, run_cli

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


def _train_command(tmp_path: Path, prepared_dir: Path, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "cifar_cli", "train", "--preset", "baseline", "--epochs", str(epochs),
        "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--run-name", "owned", "--progress", "plain",
        "--processed-dir", str(prepared_dir), "--checkpoint-dir", str(tmp_path / "ck"),
        "--log-dir", str(tmp_path / "runs"), "--set", "model.width_multiplier=2",
    ]  # fmt: skip


# Far more epochs than the test lets it train: the first process is still running when it is interrupted, however
# fast the machine (the earlier version, 6 epochs, could finish before the kill arrived).
LONG_RUN = 500


def _start_and_wait_for_epoch(command: list[str], cwd: Path, last: Path, epoch: int) -> subprocess.Popen:
    process = subprocess.Popen(command, env=ENV, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: _epoch_of(last) >= epoch or process.poll() is not None)
    assert process.poll() is None, process.communicate()[0]
    return process


def _resume_for_one_more_epoch(tmp_path: Path, prepared_dir: Path, last: Path) -> tuple[int, str]:
    done = load_checkpoint(last)["epoch"]
    again = subprocess.run(
        _train_command(tmp_path, prepared_dir, done + 1), env=ENV, cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Resuming run owned after epoch {done}" in again.stdout
    history = json.loads((tmp_path / "runs" / "owned" / "history.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, done + 2))  # no gap, no duplicate
    return done, again.stdout


def test_second_process_is_refused_then_ctrl_c_saves_and_a_rerun_resumes(tmp_path: Path, prepared_dir: Path) -> None:
    last = tmp_path / "ck" / "owned" / "last.pth"
    command = _train_command(tmp_path, prepared_dir, LONG_RUN)
    first = _start_and_wait_for_epoch(command, tmp_path, last, 1)
    try:
        second = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert first.poll() is None  # still training: the refusal below is the lock's doing
        os.kill(first.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it
        output = first.communicate(timeout=120)[0]
    finally:
        first.kill()
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"in use by process {first.pid}" in " ".join((second.stdout + second.stderr).split())
    assert first.returncode == 130, output
    assert "Resume with: cifar train --run-name owned" in " ".join(output.split())
    assert "Traceback" not in output and "Unexpected error" not in output
    _resume_for_one_more_epoch(tmp_path, prepared_dir, last)


def test_kill_9_mid_training_leaves_no_stuck_lock_and_the_rerun_resumes(tmp_path: Path, prepared_dir: Path) -> None:
    last = tmp_path / "ck" / "owned" / "last.pth"
    process = _start_and_wait_for_epoch(_train_command(tmp_path, prepared_dir, LONG_RUN), tmp_path, last, 2)
    os.kill(process.pid, signal.SIGKILL)  # in epoch 3 or later, or while saving a checkpoint
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert (tmp_path / "ck" / "owned" / ".lock").exists()  # the lock file stays; the kernel dropped the lock
    done, _ = _resume_for_one_more_epoch(tmp_path, prepared_dir, last)
    assert done >= 2
    final = load_checkpoint(last)
    assert final["epoch"] == done + 1 and [r["epoch"] for r in final["history"]] == list(range(1, done + 2))


WRITER = """
import sys, torch
from pathlib import Path
from cifar_cli.checkpoint import save_checkpoint
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
    from cifar_cli.train.run import train
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
        "wrong shape": _archive_with(tmp_path / "b", overrides={"data_batch_1": py2_pickle({b"data": data[:, :100]})}),
        "label out of range": _archive_with(tmp_path / "c", overrides={"test_batch": batch_bytes(data, labels, "t")}),
    }


def test_bad_archives_exit_2_with_one_screen_message(tmp_path: Path) -> None:
    for case, raw in _bad_archives(tmp_path).items():
        result = run_cli("prepare", "--raw-dir", str(raw), "--processed-dir", str(tmp_path / "out"))
        assert result.exit_code == 2, (case, result.output)
        assert len(result.output.splitlines()) < 15, case


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
    result = run_cli(arg.format(**names) for arg in args)
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["train", "--epochs", "1.5"], "--epochs"),
        (["train", "--batch-size", "x"], "--batch-size"),
        (["train", "--lr", "-1"], "optim.lr"),
        (["train", "--wd", "abc"], "--wd"),
        (["train", "--seed", "-3"], "train.seed"),
        (["train", "--precision", "fp8"], "train.precision"),
        (["train", "--scheduler", "exotic"], "scheduler.name"),
        (["train", "--val-size", "ten"], "--val-size"),
        (["train", "--set", "train.resume=maybe"], "train.resume"),
        (["train", "--label-smoothing", "1.5"], "optim.label_smoothing"),
        (["evaluate", "{checkpoint}", "--batch-size", "0"], "--batch-size"),
        (["predict", "{checkpoint}", "{image}", "--top-k", "20"], "at most the model's 10 classes"),
        (["bench", "--batches", "0"], "--batches"),
        (["bench", "--min-seconds", "-1"], "--min-seconds"),
        (["download", "--md5", "not-hex"], "data.md5"),
    ],
)
def test_flags_with_wrong_values_exit_2(args: list[str], named: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Each refusal is reached by its own check: a real checkpoint and image where those are not the point."""
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 120, 40)).save(image)
    result = run_cli(*[arg.format(checkpoint=tiny_checkpoint, image=image) for arg in args])
    assert result.exit_code == 2, result.output
    assert named in flat(result.output), result.output


def test_ctrl_c_during_a_checkpoint_save_waits_for_it(tmp_path: Path) -> None:
    """SIGINT sent while a save runs (from another thread, as torch's threads can take it) lands after the block:
    the checkpoint and the note of the epoch it holds are written together, then KeyboardInterrupt as usual."""
    import threading

    from cifar_cli.files import stop_signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with stop_signals_deferred():
            sender = threading.Thread(target=lambda: os.kill(os.getpid(), signal.SIGINT))
            sender.start()
            sender.join()
            time.sleep(0.05)  # Python would run the handler here, between bytecodes, without the deferral
            done.append("saved")
            done.append("noted")
    assert done == ["saved", "noted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
