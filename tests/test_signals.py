"""Signals as a terminal or a cluster sends them: Ctrl-C, SIGTERM and SIGUSR1 save a resumable state at the next
step boundary, and a resume goes on batch for batch; a SLURM job's warning signal requeues the job
(runtime/stopping.py). The one-node SLURM runs of the example scripts are in test_slurm.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_cli.errors import TrainingInterrupted
from cifar_cli.runtime import stopping
from cifar_cli.train.run import Trainer, train
from tests.conftest import assert_same_weights, tiny_settings
from tests.test_faults import _resume_for_one_more_epoch, _train_command

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
for name in ("SLURM_JOB_ID", stopping.REQUEUED_BY_PARENT, "RANK"):
    ENV.pop(name, None)


def _signal_at_step(settings, step: int, signum: int) -> Trainer:  # noqa: ANN001 - Settings
    """A trainer that sends itself `signum` during training step `step` (counted over the whole run)."""
    trainer = Trainer(settings)
    done = [0]

    def after_step() -> None:
        done[0] += 1
        if done[0] == step:
            os.kill(os.getpid(), signum)

    trainer.after_step = after_step
    return trainer


@pytest.mark.parametrize(
    ("preset", "extra", "signum"),
    [
        ("baseline", (), signal.SIGTERM),
        # the moving average, mixing draws, colour jitter and lookahead go on where they stopped
        (
            "fast",
            (
                "train.ema.half_life_steps=3",
                "train.augment.mixup=0.4",
                "train.augment.brightness=0.2",
                "train.lookahead=true",
            ),
            signal.SIGUSR1,
        ),
        ("fast", ("train.augment.alternate_flip=true", "train.augment.cutout=4"), signal.SIGINT),
    ],
)
def test_a_signal_mid_epoch_saves_there_and_the_resume_gives_identical_weights(
    tmp_path: Path, prepared_dir: Path, preset: str, extra: tuple, signum: int
) -> None:
    extra = ("model.width_multiplier=0.25", "train.epochs=3", *extra)
    straight = train(tiny_settings(tmp_path / "a", prepared_dir, *extra, preset=preset))
    per_epoch = straight.history[0]["steps"]
    assert per_epoch >= 4
    stop_at = per_epoch + 2  # the second step of epoch 2
    with pytest.raises(TrainingInterrupted) as stopped:
        _signal_at_step(tiny_settings(tmp_path / "b", prepared_dir, *extra, preset=preset), stop_at, signum).run()
    said = stopped.value.message
    assert said.startswith("Interrupted." if signum == signal.SIGINT else f"Stopped by {signal.Signals(signum).name}.")
    assert f"holds epoch 1 of run tiny, and 2 of epoch 2's {per_epoch} steps" in said
    assert stopped.value.exit_code == 130 and not stopped.value.requeue  # not a SLURM job
    saved = torch.load(tmp_path / "b" / "checkpoints" / "tiny" / "last.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["partial_epoch"]["batches"] == 2 and saved["global_step"] == stop_at

    resumed = train(tiny_settings(tmp_path / "b", prepared_dir, *extra, preset=preset))
    assert resumed.resumed_from_epoch == 1
    a, b = assert_same_weights(straight.checkpoint_dir / "last.pth", resumed.checkpoint_dir / "last.pth")
    assert [r["epoch"] for r in b["history"]] == [1, 2, 3] and b["partial_epoch"] is None
    # the stopped epoch's record counts all its steps, both parts
    assert b["history"][1]["steps"] == per_epoch
    for key in ("train_loss", "train_accuracy"):
        assert b["history"][1][key] == a["history"][1][key], key


def test_a_signal_during_the_epochs_evaluation_stops_after_its_checkpoint(tmp_path: Path, prepared_dir: Path) -> None:
    """Between the steps and the save (the evaluation): the epoch is finished and saved, nothing partial."""
    from cifar_cli.train.tracking import NullReporter

    class SignalAtFirstEpochEnd(NullReporter):
        def end_epoch(self, record: dict) -> None:
            if record["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_settings(tmp_path, prepared_dir, "train.epochs=3"), SignalAtFirstEpochEnd())
    assert stopped.value.message == "Stopped by SIGTERM. last.pth holds epoch 1 of run tiny."
    saved = torch.load(tmp_path / "checkpoints" / "tiny" / "last.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["partial_epoch"] is None


def test_a_second_ctrl_c_stops_at_once_but_a_copy_of_the_first_does_not(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: now[0])
    flag = stopping.StopFlag()
    flag.handle(signal.SIGINT, None)
    now[0] += 0.05  # the same press, passed on by torchrun
    flag.handle(signal.SIGINT, None)
    flag.handle(signal.SIGUSR1, None)  # a cluster's signal that came with it, handled after (number order)
    assert flag.signum == signal.SIGUSR1
    now[0] += stopping.SECOND_PRESS_SECONDS
    with pytest.raises(KeyboardInterrupt):
        flag.handle(signal.SIGINT, None)


def _fake_scontrol(folder: Path) -> Path:
    """An `scontrol` that writes down how it was called (the real one runs in test_slurm.py where SLURM can)."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls.txt"}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder / "calls.txt"


def _history(tmp_path: Path) -> list[int]:
    try:
        return [r["epoch"] for r in json.loads((tmp_path / "runs" / "owned" / "history.json").read_text())]
    except (OSError, ValueError):
        return []


# Outside a SLURM job nothing requeues: test_requeue_is_asked_only_by_the_process_that_speaks_for_the_job.
@pytest.mark.parametrize(("slurm", "signum"), [(True, signal.SIGUSR1), (True, signal.SIGTERM)])
def test_a_real_process_warned_saves_requeues_under_slurm_and_resumes(
    tmp_path: Path, prepared_dir: Path, slurm: bool, signum: int
) -> None:
    """`cifar train` as a process: the signal stops it with exit 130 and no traceback; inside a SLURM job the
    warning signal (SIGUSR1), and only it, calls `scontrol requeue JOB`; the same command resumes."""
    calls = _fake_scontrol(tmp_path / "bin")
    env = {**ENV, "PATH": f"{calls.parent}:{ENV['PATH']}", **({"SLURM_JOB_ID": "4242"} if slurm else {})}
    process = subprocess.Popen(
        _train_command(tmp_path, prepared_dir, 500), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _history(tmp_path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signum)
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    flat = " ".join(output.split())
    assert process.returncode == 130, output
    assert f"Stopped by {signal.Signals(signum).name}. last.pth holds epoch" in flat and "Traceback" not in output
    requeued = slurm and signum == signal.SIGUSR1
    assert calls.is_file() == requeued
    if requeued:
        assert calls.read_text().split() == ["requeue", "4242"] and "SLURM job 4242 requeued" in flat
    _resume_for_one_more_epoch(tmp_path, prepared_dir, tmp_path / "ck" / "owned" / "last.pth")  # each epoch once


def test_requeue_is_asked_only_by_the_process_that_speaks_for_the_job(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv(stopping.REQUEUED_BY_PARENT, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert stopping.asks_requeue(signal.SIGUSR1, "SIGUSR1")
    assert not stopping.asks_requeue(signal.SIGUSR1, "SIGUSR2") and not stopping.asks_requeue(signal.SIGUSR1, "none")
    assert not stopping.asks_requeue(signal.SIGINT, "SIGUSR1")
    monkeypatch.setenv("RANK", "1")  # a torchrun worker other than rank 0
    assert not stopping.asks_requeue(signal.SIGUSR1, "SIGUSR1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(stopping.REQUEUED_BY_PARENT, "1")  # a sweep's trial: the sweep requeues
    assert not stopping.asks_requeue(signal.SIGUSR1, "SIGUSR1")
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv(stopping.REQUEUED_BY_PARENT)
    assert not stopping.asks_requeue(signal.SIGUSR1, "SIGUSR1")


def test_two_processes_stop_after_the_same_step_and_resume(tmp_path: Path, prepared_dir: Path) -> None:
    """`cifar train --nproc 2`: SIGUSR1 to the launcher reaches torchrun's workers (torchrun itself ignores it),
    which agree on one step to stop after; rank 0 saves it, and the same command resumes to the end."""
    # Wider: steps slow enough that the signal lands before step 10 of the epoch, a check point (seen: step 10).
    command = [*_train_command(tmp_path, prepared_dir, 500), "--nproc", "2", "--set", "model.width_multiplier=4"]
    process = subprocess.Popen(
        command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while not _history(tmp_path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR1)  # early in epoch 2
        output = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert "Stopped by SIGUSR1. last.pth holds epoch" in " ".join(output.split()), output
    saved = torch.load(tmp_path / "ck" / "owned" / "last.pth", weights_only=True)
    partial = saved["partial_epoch"]  # None where the signal came during an evaluation
    if partial is not None:  # each rank's own numbers and streams, all stopped after one agreed step
        assert len(partial) == 2 and partial[0]["batches"] == partial[1]["batches"]
        assert partial[0]["batches"] % 10 == 0
        assert not torch.equal(partial[0]["generator_states"][0], partial[1]["generator_states"][0])
    done = saved["epoch"]
    command[command.index("--epochs") + 1] = str(done + 1)
    again = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _history(tmp_path) == list(range(1, done + 2))


def _wait_for_history(folder: Path, process: subprocess.Popen, seconds: float = 180) -> None:
    """Until some run under `folder` has finished an epoch (its history.json)."""
    deadline = time.monotonic() + seconds
    while not any(folder.glob("*/history.json")):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.1)


def test_a_parallel_sweep_warned_as_slurm_warns_requeues_its_job_once(tmp_path: Path, prepared_dir: Path) -> None:
    """SLURM signals every process of the job: the sweep and each of its trials get SIGUSR1. The trials save and
    leave the requeue to the sweep, which asks for it once, after they stopped."""
    from tests.test_sweep import _parallel_args

    calls = _fake_scontrol(tmp_path / "bin")
    env = {**ENV, "PATH": f"{calls.parent}:{ENV['PATH']}", "SLURM_JOB_ID": "88"}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "cifar_cli", *_parallel_args(tmp_path, prepared_dir, 500)], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    folder = tmp_path / "runs" / "sweeps" / "lr"
    try:
        _wait_for_history(folder, sweep)
        os.killpg(sweep.pid, signal.SIGUSR1)  # the whole process group, as slurmstepd signals a job step
        output = sweep.communicate(timeout=180)[0]
    finally:
        sweep.kill()
    assert sweep.returncode == 130 and "every running trial saved its checkpoint" in output, output
    assert calls.read_text().splitlines() == ["requeue 88"], output
    logs = [log.read_text() for log in (folder / ".trials").glob("*.log")]
    for log in logs:  # each trial stopped by the signal itself, wherever it was (training, or its set-up)
        assert "SIGUSR1" in log, log[-1500:]
    assert not any("requeued" in log for log in logs)


def test_a_study_worker_warned_queues_its_trial_again_then_requeues(tmp_path: Path, prepared_dir: Path) -> None:
    """A worker of a shared study inside a SLURM job: its trial saves, is queued again for the next worker (the
    requeued job's, or any other), and only then is the job requeued."""
    pytest.importorskip("optuna")
    from tests.test_study import _args, _trials

    calls = _fake_scontrol(tmp_path / "bin")
    env = {**ENV, "PATH": f"{calls.parent}:{ENV['PATH']}", "SLURM_JOB_ID": "77", "PYTHONUNBUFFERED": "1"}
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "cifar_cli", *_args(tmp_path, prepared_dir, storage, "0.003,0.001", 500)], env=env,
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_for_history(tmp_path / "runs" / "sweeps" / "lr", worker)
        worker.send_signal(signal.SIGUSR1)
        output = worker.communicate(timeout=180)[0]
    finally:
        worker.kill()
    said = " ".join(output.split())
    assert worker.returncode == 130 and "The trial is queued again" in said, output
    assert calls.read_text().splitlines() == ["requeue 77"] and "SLURM job 77 requeued" in said
    states = sorted(trial.state.name for trial in _trials(storage))
    assert states == ["FAIL", "WAITING"], states  # the stopped attempt, and its retry for the next worker
