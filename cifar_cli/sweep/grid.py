"""`cifar sweep`: ordinary runs over a grid (or seeded random draws) of settings, ranked on validation accuracy.

Each trial is a normal run (own folder, checkpoints, TensorBoard, resumable) under `<log_dir>/sweeps/<name>/`;
running the same sweep again skips finished trials and resumes the unfinished one. Trials are ranked by
**validation** accuracy (mean ± std over seeds); the test accuracy of the chosen recipe is reported once, labelled
as such, and chooses nothing. Every trial holds out a validation split (`data.val_size`, 5,000 or a tenth of
smaller data, unless given).
"""

from __future__ import annotations

import copy
import csv
import ctypes
import io
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_cli.config.settings import Settings, dump_yaml, held_out_images, load_settings, set_dotted
from cifar_cli.data.prepare import read_manifest
from cifar_cli.errors import DEBUG_VARIABLE, ExitCode, SettingsError, UsageError
from cifar_cli.files import write_text_atomically
from cifar_cli.runs import SWEEPS_FOLDER, list_runs, recorded_differences
from cifar_cli.runtime.stopping import REQUEUED_BY_PARENT
from cifar_cli.sweep.axes import cartesian


@dataclass(frozen=True)
class Trial:
    index: int
    values: dict[str, Any]  # every --set of the sweep (one-value ones are fixed) and the seed
    varied: tuple[str, ...]  # the keys with several values: what tells recipes apart
    name: str  # run folder name


def plan_trials(axes: list[tuple[str, list[Any]]], seeds: list[int], samples: int | None, seed: int = 0) -> list[Trial]:
    """The Cartesian product of the axes, each with every seed; or `samples` seeded random draws from it."""
    varied = tuple(key for key, values in axes if len(values) > 1)
    grid = cartesian(axes)
    if samples is not None:
        grid = random.Random(seed).sample(grid, min(samples, len(grid)))
    trials = []
    for combo in grid:
        for run_seed in seeds:
            values = {**combo, "train.seed": run_seed}
            trials.append(Trial(len(trials), values, varied, f"t{len(trials):03d}_{trial_label(values, varied)}"[:120]))
    return trials


def trial_label(values: dict[str, Any], varied: tuple[str, ...]) -> str:
    """`lr0.01_momentum0.9_seed0`: the varied settings and the seed, as a run folder name can hold them."""
    return "_".join(f"{key.split('.')[-1]}{_short(values[key])}" for key in (*varied, "train.seed"))


def _short(value: Any) -> str:
    return re.sub(r"[^\w.-]", "_", f"{value:g}" if isinstance(value, float) else str(value))


def trial_settings(
    trial: Trial, config: Path | None, fixed: dict[str, Any], sweep_name: str, val_size: int
) -> Settings:
    overrides: dict[str, Any] = copy.deepcopy(fixed)
    for key, value in trial.values.items():
        set_dotted(overrides, key, value)
    log = overrides.setdefault("log", {})
    base = load_settings(config, copy.deepcopy(overrides))
    log["log_dir"] = str(base.log.log_dir / SWEEPS_FOLDER / sweep_name)
    log["checkpoint_dir"] = str(base.log.checkpoint_dir / SWEEPS_FOLDER / sweep_name)
    overrides.setdefault("train", {})["run_name"] = trial.name
    overrides.setdefault("data", {}).setdefault("val_size", val_size)
    # Trials compare like with like: a budget trains the recipe named (or the default), never a ladder's rung.
    overrides.setdefault("preset", base.preset)
    return load_settings(config, overrides)


def validation_images(settings: Settings) -> int:
    """5,000, or a tenth of a smaller training split: every trial is ranked on a held-out split."""
    counts = (read_manifest(settings.data.processed_dir) or {}).get("counts", {})
    return held_out_images(counts.get("train", 50_000))


def check_all(trials: list[Trial], build: Callable[[Trial], Settings]) -> list[Settings]:
    """Every trial's settings, validated before the first one starts: one table of every bad value."""
    built, rows = [], []
    for trial in trials:
        try:
            built.append(build(trial))
        except SettingsError as error:
            rows += [(f"{trial.name}: {field}", problem, given) for field, problem, given in error.rows]
    if rows:
        raise SettingsError(f"{len({row[0].split(':')[0] for row in rows})} trial(s) have bad values.", rows)
    return built


def check_earlier_trials(trials: list[Trial], built: list[Settings], folder: Path) -> None:
    """A trial name holds only the varied values and the seed: a sweep run again under the same name reuses (or
    resumes) its trials only where everything else that makes a result is the same too, else it is refused."""
    rows = [
        (f"{trial.name}: {key}", f"was {before!r} in the earlier sweep", repr(now))
        for trial, settings in zip(trials, built)
        for key, before, now in recorded_differences(folder / trial.name, settings)
    ]
    if rows:
        raise SettingsError(
            f"Sweep {folder.name!r} was run before with other settings: its trials answer another question.",
            rows[:12] + ([("...", f"and {len(rows) - 12} more", "")] if len(rows) > 12 else []),
            hint=f"Give this sweep a new --name (or delete {folder} to train its trials again).",
        )


@dataclass(frozen=True)
class RecipeResult:
    values: dict[str, Any]  # the swept settings, seed excluded
    trials: list[str]
    val_mean: float | None
    val_std: float | None
    test_accuracies: list[float]


def rank(trials: list[Trial], summaries: dict[str, Any]) -> list[RecipeResult]:
    """Recipes (trials that differ only in seed) ranked by mean validation accuracy, best first."""
    groups: dict[str, list[Trial]] = {}
    for trial in trials:
        recipe = {key: trial.values[key] for key in trial.varied}
        groups.setdefault(json.dumps(recipe, sort_keys=True), []).append(trial)
    results = []
    for key, members in groups.items():
        done = [
            summaries[t.name] for t in members if t.name in summaries and summaries[t.name].val_accuracy is not None
        ]
        vals = [s.val_accuracy for s in done]
        results.append(
            RecipeResult(
                json.loads(key),
                [t.name for t in members],
                statistics.mean(vals) if vals else None,
                statistics.stdev(vals) if len(vals) > 1 else None,
                [s.test_accuracy for s in done if s.test_accuracy is not None],
            )
        )
    return sorted(results, key=lambda r: (r.val_mean is None, -(r.val_mean or 0.0)))


def write_results(folder: Path, ranked: list[RecipeResult], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """sweep.json (everything, plus `extra`: a shared study's name and pruned trials) and sweep.csv (one row per
    recipe), written atomically; returns the document."""
    rows = [
        {
            **r.values,
            "val_accuracy_mean": r.val_mean,
            "val_accuracy_std": r.val_std,
            "seeds": len(r.trials),
            "trials": " ".join(r.trials),
        }
        for r in ranked
    ]
    chosen = ranked[0] if ranked and ranked[0].val_mean is not None else None
    document = {
        "ranked_by": "validation accuracy (mean over seeds)",
        "recipes": rows,
        "chosen": chosen.values if chosen else None,
        # Reported once, for the recipe chosen on validation; it chose nothing.
        "chosen_test_accuracy_mean": statistics.mean(chosen.test_accuracies)
        if chosen and chosen.test_accuracies
        else None,
        **(extra or {}),
    }
    write_text_atomically(folder / "sweep.json", json.dumps(document, indent=2))
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text_atomically(folder / "sweep.csv", buffer.getvalue())
    return document


def sweep_folder(settings: Settings, name: str) -> Path:
    return settings.log.log_dir / SWEEPS_FOLDER / name


def default_name(axes: list[tuple[str, list[Any]]]) -> str:
    if not axes:
        raise UsageError("Nothing to sweep.", hint="Give at least one --set key=v1,v2.")
    varied = [key for key, values in axes if len(values) > 1] or [key for key, _ in axes]
    return "-".join(key.split(".")[-1] for key in varied)


def run_trials(
    trials: list[Trial],
    built: list[Settings],
    folder: Path,
    train_one: Callable[[Settings], Any],
    say: Callable[[str], None] = lambda _text: None,
    on_update: Callable[[list[TrialStatus]], None] = lambda _rows: None,
) -> dict[str, Any]:
    """Train every trial not finished yet, one after another, each with the machine to itself; then the
    summaries of every trial (`cifar_cli.runs`). Ctrl-C stops inside a trial after its last checkpoint; the same
    command again skips what finished and resumes that trial. `on_update` gets the status of every trial before
    each one starts and at the end."""
    finished = _finished_runs(folder)
    statuses = [TrialStatus(trial, "skipped" if trial.name in finished else "queued") for trial in trials]
    for status, settings in zip(statuses, built):
        if status.state == "skipped":
            say(f"Trial {status.trial.index + 1}/{len(trials)} {status.trial.name}: finished before, skipped.")
            continue
        status.state = "running"
        _refresh(statuses, folder)
        on_update(statuses)
        say(f"Trial {status.trial.index + 1}/{len(trials)} {status.trial.name}")
        train_one(settings)
        status.state = "finished"
    _refresh(statuses, folder)
    on_update(statuses)
    return summaries_of(folder)


def summaries_of(folder: Path) -> dict[str, Any]:
    return {run.name: run for run in list_runs(folder)} if folder.is_dir() else {}


def machine_slots(jobs: int, device: str) -> list[Slot]:
    """Slots for `--jobs N` on this machine: its usable cores split, one GPU per trial where there are several."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if wants_cuda else 0
    return plan_slots(jobs, cores, gpus)


# ------------------------------------------------------------------------------------------------ parallel trials

TRIALS_FOLDER = ".trials"  # per-trial settings files and output logs of `--jobs N` runs
POLL_SECONDS = 2.0  # how often the status table is refreshed while trials run in parallel
STOP_GRACE_SECONDS = 120  # after Ctrl-C, how long a trial may take to save its checkpoint before it is killed
# What a trial's `cifar train` exit code means; any other code: failed.
EXIT_STATES = {ExitCode.OK: "finished", ExitCode.INTERRUPTED: "interrupted"}


@dataclass(frozen=True)
class Slot:
    """What one parallel trial gets: CPU threads and, on a machine with several GPUs, one GPU of its own."""

    threads: int
    gpu: int | None = None


def plan_slots(jobs: int, cpu_cores: int, gpus: int) -> list[Slot]:
    """`jobs` slots with the cores split evenly (at least one thread each); with several GPUs, one GPU per slot,
    and no more slots than GPUs."""
    if gpus > 1:
        jobs = min(jobs, gpus)
    threads = max(1, cpu_cores // jobs)
    return [Slot(threads, index if gpus > 1 else None) for index in range(jobs)]


@dataclass
class TrialStatus:
    """One row of the live table."""

    trial: Trial
    state: str = "queued"  # queued, running, finished, interrupted, failed, skipped
    epochs_done: int = 0
    epochs_planned: int | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0
    log: Path | None = None  # the trial's output, for a failed one


def run_parallel(
    trials: list[Trial],
    built: list[Settings],
    folder: Path,
    slots: list[Slot],
    on_update: Callable[[list[TrialStatus]], None] = lambda _rows: None,
    poll_seconds: float = POLL_SECONDS,
) -> list[TrialStatus]:
    """Train the unfinished trials `len(slots)` at a time, each in its own `cifar train` process with its slot's
    threads (and GPU). Ctrl-C is passed on to every running trial, which saves its checkpoint and stops; the same
    command again skips finished trials and resumes the others. A trial that fails is reported with its log."""
    statuses = [TrialStatus(trial) for trial in trials]
    finished = _finished_runs(folder)
    queue = []
    for status, settings in zip(statuses, built):
        if status.trial.name in finished:
            status.state = "skipped"
        else:
            queue.append((status, settings))
    (folder / TRIALS_FOLDER).mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple[TrialStatus, subprocess.Popen, Slot]] = {}
    free = list(slots)
    try:
        while queue or running:
            while queue and free:
                status, settings = queue.pop(0)
                slot = free.pop(0)
                process = _launch(status, settings, slot, folder / TRIALS_FOLDER)
                running[process.pid] = (status, process, slot)
            _refresh(statuses, folder)
            on_update(statuses)
            time.sleep(poll_seconds)
            for pid, (status, process, slot) in list(running.items()):
                if process.poll() is not None:
                    status.state = EXIT_STATES.get(process.returncode, "failed")
                    del running[pid]
                    free.append(slot)
    except KeyboardInterrupt:
        _stop_all([process for _, process, _ in running.values()])
        for status, _, _ in running.values():
            status.state = "interrupted"
        _refresh(statuses, folder)
        on_update(statuses)
        raise
    _refresh(statuses, folder)
    on_update(statuses)
    return statuses


def _finished_runs(folder: Path) -> set[str]:
    return {run.name for run in list_runs(folder) if run.state == "finished"} if folder.is_dir() else set()


def _launch(status: TrialStatus, settings: Settings, slot: Slot, work: Path) -> Any:
    """`python -m cifar_cli train --config <the trial's settings>`, its output in a log file next to them."""
    settings = settings.model_copy(deep=True)
    settings.train.num_threads = slot.threads
    settings.log.progress = "plain"
    config = work / f"{status.trial.name}.yaml"
    write_text_atomically(config, dump_yaml(settings))
    env = {**os.environ, "OMP_NUM_THREADS": str(slot.threads), "PYTHONUNBUFFERED": "1"}
    # The settings file says everything; CIFAR_DEBUG is no setting (a trial's crash shows its traceback too).
    env = {key: value for key, value in env.items() if not key.startswith("CIFAR_") or key == DEBUG_VARIABLE}
    env[REQUEUED_BY_PARENT] = "1"  # a cluster's warning requeues the sweep's job once, from the sweep
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
    status.log = work / f"{status.trial.name}.log"
    status.state = "running"
    with status.log.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cifar_cli", "train", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_stop_with_parent,
        )


def _stop_with_parent() -> None:
    """In the child, before it starts: SIGINT handled (a sweep started in the background, `nohup ... &`, has it
    ignored, and a trial would inherit that and never stop), and, on Linux, SIGINT when the sweep dies (even by
    kill -9), so a trial saves its checkpoint and stops instead of running on without an owner."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python turns a default SIGINT into KeyboardInterrupt
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def _stop_all(processes: list[Any]) -> None:
    """SIGINT to every running trial (a terminal's Ctrl-C reaches them already; `kill -INT` of the sweep does not),
    then wait for their checkpoints; kill what has not stopped after STOP_GRACE_SECONDS."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()


def _refresh(statuses: list[TrialStatus], folder: Path) -> None:
    """Epochs, accuracies and time of every trial from its run folder (what `cifar runs` reads)."""
    if not folder.is_dir():
        return
    try:
        summaries = {run.name: run for run in list_runs(folder)}
    except UsageError:  # a file being replaced at this instant: the next poll reads it
        return
    for status in statuses:
        run = summaries.get(status.trial.name)
        if run is None:
            continue
        status.epochs_done, status.epochs_planned = run.epochs_done, run.epochs_planned
        status.val_accuracy, status.test_accuracy, status.seconds = (run.val_accuracy, run.test_accuracy, run.seconds)
