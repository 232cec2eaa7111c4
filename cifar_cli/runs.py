"""What runs a log folder holds, read from the files each run leaves (`settings.yaml`, `history.json`,
`final_metrics.json`, `.lock`), without opening a checkpoint: the core of `cifar runs`."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_cli.config.settings import Settings
from cifar_cli.data import adopt_prepared
from cifar_cli.errors import UsageError
from cifar_cli.files import LOCK_FILE, process_alive
from cifar_cli.train.identity import recipe_differences, recipe_identity
from cifar_cli.train.tracking import (
    FINAL_METRICS_FILE,
    HISTORY_FILE,
    PRUNED_FILE,
    REQUEST_FILE,
    SETTINGS_FILE,
    read_history,
)

SORT_KEYS = ("name", "val_accuracy", "test_accuracy", "seconds", "epochs_done")
SWEEPS_FOLDER = "sweeps"  # `cifar sweep` puts each sweep's trials in <log_dir>/sweeps/<sweep name>/<trial>/


@dataclass
class RunSummary:
    name: str
    preset: str | None
    model: str | None
    epochs_done: int
    epochs_planned: int | None
    val_accuracy: float | None  # last epoch's, where the run holds out a validation split
    test_accuracy: float | None  # final_metrics.json: the last weights on the test split
    seconds: float  # training time, summed over the epochs
    state: str  # finished, running, interrupted, pruned (a sweep's pruner stopped it)
    differing: dict[str, Any] = field(default_factory=dict)  # settings that differ between the runs of its group
    sweep: str | None = None  # the sweep the run is a trial of (<log_dir>/sweeps/<sweep>/), None for plain runs

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def list_runs(log_dir: Path, sort: str = "name") -> list[RunSummary]:
    """Every run folder under `log_dir`, then every sweep's trials (grouped by sweep), each with the settings in
    which it differs from the others of its group; damaged files are named."""
    if sort not in SORT_KEYS:
        raise UsageError(f"Unknown sort key {sort!r}.", hint=f"Use one of: {', '.join(SORT_KEYS)}.")
    if not log_dir.is_dir():
        raise UsageError(f"No log folder at {log_dir}.", hint="Train first, or pass --log-dir.")
    sweeps = log_dir / SWEEPS_FOLDER
    groups: list[tuple[str | None, Path]] = [(None, log_dir)]
    if sweeps.is_dir():
        groups += [(folder.name, folder) for folder in sorted(sweeps.iterdir()) if folder.is_dir()]
    return [run for sweep, folder in groups for run in _group(folder, sweep, sort)]


def _group(parent: Path, sweep: str | None, sort: str) -> list[RunSummary]:
    folders = sorted(p for p in parent.iterdir() if (p / SETTINGS_FILE).is_file() or (p / HISTORY_FILE).is_file())
    settings = {folder.name: read_run_settings(folder) for folder in folders}
    identities = {name: recipe_identity(plain) for name, plain in settings.items()}
    varying = _varying_keys(list(identities.values()))
    runs = [_summary(folder, settings[folder.name], identities[folder.name], varying) for folder in folders]
    for run in runs:
        run.sweep = sweep
    return sorted(runs, key=lambda run: _sort_value(run, sort))


def recorded_differences(run_folder: Path, settings: Settings) -> list[tuple[str, Any, Any]]:
    """(setting, as the run in `run_folder` recorded it, as `settings` ask now) for what makes a run's result: its
    recipe and its length (the epochs, or the time budget that chose them). Empty where no run was recorded."""
    stored = read_run_settings(run_folder)
    if not stored:
        return []
    settings = settings.model_copy(update={"data": adopt_prepared(settings.data)})  # as the run recorded its data
    request = read_run_settings(run_folder, REQUEST_FILE)  # {} for a run of an older version: its plan's settings
    differences = recipe_differences(request or stored, settings, planned=not request)
    before, now = (request or stored).get("train", {}), settings.train
    length = "time_budget" if now.time_budget is not None or before.get("time_budget") is not None else "epochs"
    if before.get(length) != getattr(now, length):
        differences.append((f"train.{length}", before.get(length), getattr(now, length)))
    return differences


def read_run_settings(folder: Path, name: str = SETTINGS_FILE) -> dict[str, Any]:
    """The resolved settings a run folder records (or its request.yaml: `name`), {} where it records none; a
    damaged file is a UsageError."""
    try:
        plain = yaml.safe_load((folder / name).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"{folder / name} is damaged ({type(error).__name__}).") from None
    return plain if isinstance(plain, dict) else {}


def _varying_keys(identities: list[dict[str, Any]]) -> list[str]:
    keys = sorted({key for identity in identities for key in identity})
    return [key for key in keys if len({json.dumps(identity.get(key)) for identity in identities}) > 1]


def _summary(folder: Path, plain: dict[str, Any], identity: dict[str, Any], varying: list[str]) -> RunSummary:
    history = read_history(folder)
    final = _read_json(folder / FINAL_METRICS_FILE)
    val = [record["val_accuracy"] for record in history if "val_accuracy" in record]
    return RunSummary(
        name=folder.name,
        preset=plain.get("preset"),
        model=plain.get("model", {}).get("name"),
        epochs_done=len(history),
        epochs_planned=plain.get("train", {}).get("epochs"),
        val_accuracy=val[-1] if val else None,
        test_accuracy=final.get("accuracy") if final else None,
        seconds=sum(record.get("seconds", 0.0) for record in history),
        state=_state(folder, history, final),
        differing={key: identity.get(key) for key in varying},
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{path} is damaged ({type(error).__name__}).") from None
    return value if isinstance(value, dict) else None


def _state(folder: Path, history: list[dict[str, Any]], final: dict | None) -> str:
    if _owner_alive(folder / LOCK_FILE):
        return "running"
    if final is not None and final.get("epochs") == len(history):
        return "finished"
    return "pruned" if (folder / PRUNED_FILE).is_file() else "interrupted"


def _owner_alive(lock: Path) -> bool:
    """The lock file names its owner ("process PID on HOST since ...") while the run is owned and is emptied when
    it is released; a process killed with -9 leaves its line, but its PID no longer runs. Reading never takes the
    lock, so listing runs cannot get in the way of a run that is starting."""
    try:
        words = lock.read_text().split()
    except OSError:
        return False
    if len(words) < 4 or words[0] != "process" or not words[1].isdigit():
        return False
    return words[3] == socket.gethostname() and process_alive(int(words[1]))


def _sort_value(run: RunSummary, key: str) -> tuple:
    value = getattr(run, key)
    if key == "name":
        return (0, value)
    # best first; runs without the number last
    return (1, 0.0, run.name) if value is None else (0, -float(value), run.name)
