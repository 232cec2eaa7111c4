"""Several seeds of one recipe in one process (`cifar train --seeds 0-9`): each seed is a run of its own (folder,
checkpoints, final_metrics.json, resumable alone), trained one after the other so that what a process warms up
once (imported modules, the speed cache, compiled graphs, the GPU's kernel choices) serves every seed; then the
mean and standard deviation of the final test accuracy and of the training time, written as JSON."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_cli.config.settings import Settings
from cifar_cli.errors import SettingsError
from cifar_cli.files import write_text_atomically
from cifar_cli.train.identity import identity_digest, recipe_identity
from cifar_cli.train.report import TrainResult
from cifar_cli.train.run import TrainingInterrupted
from cifar_cli.train.tracking import FINAL_METRICS_FILE

MAX_SEEDS = 1000
RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_seeds(text: str) -> list[int]:
    """`0-9` (both ends included) or `0,3,7` (or a mix: `0-2,7`), each seed once, in the order given."""
    seeds: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        if match := RANGE.match(part):
            first, last = int(match.group(1)), int(match.group(2))
            seeds += list(range(first, last + 1)) if first <= last else []
        elif part.isdigit():
            seeds.append(int(part))
        else:
            seeds = []
            break
    if not seeds or len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS:
        raise SettingsError(
            "Bad option.", [("--seeds", "whole numbers as 0-9 or 0,3,7, each once, ascending ranges", text)]
        )
    return seeds


@dataclass(frozen=True)
class SeedRun:
    seed: int
    run_name: str
    accuracy: float | None  # final test accuracy (with the recipe's TTA)
    train_seconds: float | None
    wall_seconds: float | None  # the run's command time, set-up to final evaluation (this run only)


@dataclass(frozen=True)
class SeedsSummary:
    runs: list[SeedRun]
    path: Path  # the JSON document

    def stats(self, key: str) -> tuple[float, float] | None:
        """(mean, sample standard deviation; 0 for one seed) of a SeedRun field over the seeds that have it."""
        values = [getattr(run, key) for run in self.runs if getattr(run, key) is not None]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": [run.seed for run in self.runs],
            "runs": [vars(run) for run in self.runs],
            **{
                key: {"mean": stats[0], "std": stats[1]}
                for key in ("accuracy", "train_seconds", "wall_seconds")
                if (stats := self.stats(key)) is not None
            },
        }


def seed_settings(settings: Settings, seed: int, named: bool) -> Settings:
    """The settings of one seed's run: its seed, and `<run name>-seed<S>` where the user named the run (an unnamed
    run's default name already differs by seed)."""
    each = settings.model_copy(deep=True)
    each.train.seed = seed
    if named:
        each.train.run_name = f"{settings.train.run_name}-seed{seed}"
    return each


def summary_path(settings: Settings) -> Path:
    """`<log dir>/seeds-<preset>-<model>-<hash of the recipe but its seed>.json`: the same seeds of the same recipe
    write the same file."""
    identity = {key: value for key, value in recipe_identity(settings.to_plain()).items() if key != "train.seed"}
    return settings.log.log_dir / f"seeds-{settings.preset}-{settings.model.name}-{identity_digest(identity)}.json"


def train_seeds(
    settings: Settings, seeds: list[int], train_one: Callable[[Settings], TrainResult], say: Callable[[str], None]
) -> SeedsSummary:
    """Train `seeds` one after the other with `train_one` (the CLI's `train` with its reporter and figures)."""
    named = settings.train.run_name is not None
    runs: list[SeedRun] = []
    for index, seed in enumerate(seeds, start=1):
        say(f"Seed {seed} ({index} of {len(seeds)}).")
        try:
            result = train_one(seed_settings(settings, seed, named))
        except TrainingInterrupted as stopped:  # Ctrl-C: the same --seeds command goes on where this one stopped
            raise stopped.reworded(
                stopped.message,
                hint="Run the same --seeds command again: finished seeds are kept, this one resumes, the rest train.",
            ) from None
        final = result.final_metrics or _recorded_final(result.run_dir)  # a finished run trains nothing again
        runs.append(
            SeedRun(seed, result.run_name, final.get("accuracy"), final.get("train_seconds"), final.get("wall_seconds"))
        )
    summary = SeedsSummary(runs, summary_path(settings))
    write_text_atomically(summary.path, json.dumps(summary.to_json(), indent=2))
    return summary


def _recorded_final(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / FINAL_METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
