"""`cifar sweep`: grids and random draws of ordinary runs, ranked on validation accuracy, resumable."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from cifar_cli.errors import SettingsError
from cifar_cli.sweep.axes import parse_axis
from cifar_cli.sweep.grid import plan_trials
from tests.conftest import flat, run_cli


def test_axis_syntax() -> None:
    assert parse_axis("optim.lr=0.5,1.0,2") == ("optim.lr", [0.5, 1.0, 2])
    assert parse_axis("train.batch_size=range(256, 1024, 256)") == ("train.batch_size", [256, 512, 768])
    assert parse_axis("optim.lr=log(0.001,0.1,3)") == ("optim.lr", [0.001, 0.01, 0.1])
    assert parse_axis("optim.name=sgd,adam") == ("optim.name", ["sgd", "adam"])
    for bad in ("optim.lr", "optim.lr=range(1,1)", "optim.lr=log(0,1,3)", "optim.lr=range(a,b)"):
        with pytest.raises(SettingsError):
            parse_axis(bad)


def test_ranges_exclude_their_end_and_keep_the_written_precision() -> None:
    # Binary floating point would give 0.7999999999999999, 0.8999999999999999 and then 1.0 (b included).
    assert parse_axis("optim.momentum=range(0.7,1.0,0.1)")[1] == [0.7, 0.8, 0.9]
    assert parse_axis("optim.label_smoothing=range(0,0.3,0.05)")[1] == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    assert parse_axis("train.epochs=range(10,0,-3)")[1] == [10, 7, 4, 1]
    trials = plan_trials([parse_axis("optim.label_smoothing=range(0.1,0.2,0.05)")], [0], None)
    assert [t.name for t in trials] == ["t000_label_smoothing0.1_seed0", "t001_label_smoothing0.15_seed0"]


def test_grid_times_seeds_and_seeded_random_draws() -> None:
    axes = [("optim.lr", [0.1, 0.2, 0.3]), ("optim.momentum", [0.8, 0.9])]
    grid = plan_trials(axes, [0, 1], None)
    assert len(grid) == 12 and len({t.name for t in grid}) == 12
    assert grid[0].values == {"optim.lr": 0.1, "optim.momentum": 0.8, "train.seed": 0}
    assert grid[0].name == "t000_lr0.1_momentum0.8_seed0" and grid[0].varied == ("optim.lr", "optim.momentum")
    drawn = plan_trials(axes, [0], samples=4, seed=7)
    assert len(drawn) == 4 and drawn == plan_trials(axes, [0], samples=4, seed=7)
    assert {tuple(t.values.items()) for t in drawn} <= {tuple(t.values.items()) for t in plan_trials(axes, [0], None)}


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
    """A real SIGINT during the third trial's second epoch (after its first epoch's checkpoint): the sweep stops
    with exit 130; the same command again skips the two finished trials and resumes the third from epoch 1."""
    import os
    import signal

    from cifar_cli.train.loop import EpochRunner

    real_run, started = EpochRunner.run, []

    def ctrl_c_in_the_third_trials_second_epoch(self, progress, remaining, *args):  # noqa: ANN001, ANN002, ANN202
        if progress.epoch == 0:
            started.append(self.settings.train.run_name)
        if len(started) == 3 and progress.epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: KeyboardInterrupt in the middle of the epoch
        return real_run(self, progress, remaining, *args)

    monkeypatch.setattr(EpochRunner, "run", ctrl_c_in_the_third_trials_second_epoch)
    args = _sweep(tmp_path, prepared_dir)
    args[args.index("--epochs") + 1] = "2"
    args[args.index("log.progress=none")] = "log.progress=plain"  # the resume message is the runs' own
    first = run_cli(*args)
    assert first.exit_code == 130 and "same `cifar sweep` command again" in first.output, first.output
    interrupted = started[2]
    checkpoint = tmp_path / "ck" / "sweeps" / "lr" / interrupted / "last.pth"
    assert torch_epoch(checkpoint) == 1  # a real partial trial: one epoch done, the second cut short
    monkeypatch.setattr(EpochRunner, "run", real_run)
    again = run_cli(*args)
    assert again.exit_code == 0, again.output
    assert again.output.count("finished before, skipped") == 2
    assert f"Resuming run {interrupted} after epoch 1" in again.output
    history = json.loads((tmp_path / "runs" / "sweeps" / "lr" / interrupted / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]

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
    result = run_cli(*args)
    assert result.exit_code == 2 and "optim.lr" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_rerun_with_another_recipe_is_refused_not_answered_with_old_trials(
    tmp_path: Path, prepared_dir: Path
) -> None:
    """The trial names hold only the swept values and the seed: the same sweep with another --epochs (or preset, or
    fixed --set) must not skip its finished trials as if they answered the new question."""
    args = [arg for arg in _sweep(tmp_path, prepared_dir) if arg != "0,1"]
    args[args.index("--seeds") + 1 : args.index("--seeds") + 1] = ["0"]
    assert run_cli(*args).exit_code == 0
    folder = tmp_path / "runs" / "sweeps" / "lr"
    before = {p.name: (p / "final_metrics.json").stat().st_mtime_ns for p in folder.iterdir() if p.is_dir()}
    assert len(before) == 2
    same = run_cli(*args)
    assert same.exit_code == 0 and same.output.count("finished before, skipped") == 2
    for changed, setting in ((["--epochs", "2"], "train.epochs"), (["--set", "optim.momentum=0.5"], "optim.momentum")):
        if changed[0] == "--epochs":
            longer = list(args)
            longer[longer.index("--epochs") + 1] = "2"
        else:
            longer = [*args, *changed]
        result = run_cli(*longer)
        assert result.exit_code == 2, result.output
        text = flat(result.output)
        assert "was run before with other settings" in text and setting in text and "new --name" in text
    after = {p.name: (p / "final_metrics.json").stat().st_mtime_ns for p in folder.iterdir() if p.is_dir()}
    assert after == before  # nothing trained, nothing overwritten
    renamed = list(args)
    renamed[renamed.index("--name") + 1] = "lr-two-epochs"
    renamed[renamed.index("--epochs") + 1] = "2"
    assert run_cli(*renamed).exit_code == 0


def test_slots_split_the_cores_and_give_each_trial_its_own_gpu() -> None:
    from cifar_cli.sweep.grid import Slot, plan_slots

    assert plan_slots(2, 16, 0) == [Slot(8), Slot(8)]
    assert plan_slots(3, 2, 0) == [Slot(1), Slot(1), Slot(1)]  # never zero threads
    assert plan_slots(8, 64, 4) == [Slot(16, 0), Slot(16, 1), Slot(16, 2), Slot(16, 3)]  # one trial per GPU
    assert plan_slots(2, 16, 1) == [Slot(8), Slot(8)]  # one GPU: shared, as any single-GPU run


def _parallel_args(tmp_path: Path, prepared_dir: Path, epochs: int) -> list[str]:
    args = _sweep(tmp_path, prepared_dir, "--jobs", "2")
    args[args.index("--seeds") + 1] = "0"
    args[args.index("--epochs") + 1] = str(epochs)
    return args


def test_jobs_run_trials_at_once_with_the_cores_split(tmp_path: Path, prepared_dir: Path) -> None:
    """Two real `cifar train` processes, seen running at the same time by their own locks, one thread each here."""
    from cifar_cli.config.settings import load_settings, parse_set_options
    from cifar_cli.runs import list_runs
    from cifar_cli.sweep import grid as sweeps

    trials = sweeps.plan_trials([("optim.lr", [0.001, 0.003])], [0], None)
    fixed = parse_set_options([
        "preset=baseline", f"data.processed_dir={prepared_dir}", f"log.log_dir={tmp_path / 'runs'}",
        f"log.checkpoint_dir={tmp_path / 'ck'}", "train.epochs=40", "train.batch_size=16", "train.device=cpu",
        "train.precision=fp32", "train.channels_last=true",
    ])  # fmt: skip
    built = [sweeps.trial_settings(t, None, fixed, "par", 10) for t in trials]
    folder = sweeps.sweep_folder(load_settings(None, fixed), "par")
    seen_together = []

    def watch(rows) -> None:  # noqa: ANN001
        live = [run.name for run in list_runs(folder) if run.state == "running"] if folder.is_dir() else []
        seen_together.append(len(live))

    slots = [sweeps.Slot(1), sweeps.Slot(1)]
    statuses = sweeps.run_parallel(trials, built, folder, slots, watch, poll_seconds=0.2)
    assert [status.state for status in statuses] == ["finished", "finished"], [s.log.read_text() for s in statuses]
    assert max(seen_together) == 2
    for trial in trials:
        stored = (folder / trial.name / "settings.yaml").read_text()
        assert "num_threads: 1" in stored and "epochs: 40" in stored
    assert {run.state for run in list_runs(folder)} == {"finished"}


@pytest.mark.parametrize("how", ["ctrl-c", "kill-9", "kill-9 of a background sweep"])
def test_parallel_sweep_stops_its_trials_with_checkpoints(tmp_path: Path, prepared_dir: Path, how: str) -> None:
    """Ctrl-C (SIGINT to the sweep): every trial saves and stops, exit 130. kill -9 of the sweep: its trials get
    SIGINT from the kernel (parent-death signal), save and stop instead of running on unowned, also when the sweep
    was started in the background (`cifar sweep ... &` ignores SIGINT, and its trials must not inherit that)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cifar_cli", *_parallel_args(tmp_path, prepared_dir, 2000)]
    background = how.endswith("background sweep")
    sweep = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None,
    )  # fmt: skip
    folder = tmp_path / "runs" / "sweeps" / "lr"
    deadline = time.monotonic() + 180

    def epochs(name: str) -> int:
        try:
            return len(json.loads((folder / name / "history.json").read_text()))
        except (OSError, ValueError):
            return 0

    names = ["t000_lr0.001_seed0", "t001_lr0.003_seed0"]
    while min(epochs(name) for name in names) < 2:
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.stdout.read() if sweep.poll() else "slow"
        time.sleep(0.2)
    owners = [int((folder / name / ".lock").read_text().split()[1]) for name in names]
    sweep.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    output = sweep.communicate(timeout=180)[0]
    if how == "ctrl-c":
        assert sweep.returncode == 130 and "every running trial saved its checkpoint" in output, output
    for pid in owners:  # the trials stop too, after saving
        for _ in range(600):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"trial process {pid} still runs")
    for name in names:  # each trial took the SIGINT path: it says where it stopped, its checkpoint agrees
        log = (folder / ".trials" / f"{name}.log").read_text()
        said = re.search(r"last\.pth holds epoch (\d+) of run", log)
        assert said, log[-2000:]
        saved = torch_epoch(tmp_path / "ck" / "sweeps" / "lr" / name / "last.pth")
        assert 2 <= saved == int(said.group(1)) < 2000 and epochs(name) in (saved - 1, saved)
        assert (folder / name / ".lock").read_text() == ""  # released: no live owner


def torch_epoch(path: Path) -> int:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
