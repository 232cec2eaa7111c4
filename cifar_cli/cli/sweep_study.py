"""`cifar sweep --storage URL`: this process is one worker of an Optuna study that others (here or on other machines)
share; the core is `cifar_cli/sweep/study.py`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cifar_cli.cli.common import console
from cifar_cli.config.settings import Settings
from cifar_cli.errors import SettingsError, TrainingInterrupted, UsageError


def check_local_options(trials: int | None, sampler: str | None, pruner: str | None, timeout: str | None) -> None:
    """Options that only a shared study reads are refused without --storage, not silently ignored."""
    given = [
        flag
        for flag, value in (("--trials", trials), ("--sampler", sampler), ("--pruner", pruner), ("--timeout", timeout))
        if value is not None
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)} need --storage.",
            hint="Share a study through a storage, e.g. --storage sqlite:///sweep.db (or a file sweep.journal).",
        )


def run_study(
    axes: list[str],
    seeds: list[int],
    options: dict[str, Any],
    base: Settings,
    build_fixed: dict[str, Any],
    config: Path | None,
    sweep_name: str,
) -> None:
    """One worker: trials until the study has its count, then the whole study ranked into sweep.csv/json/png."""
    from cifar_cli.config.durations import parse_duration
    from cifar_cli.sweep import grid as sweeps
    from cifar_cli.sweep import space
    from cifar_cli.sweep import study as studies
    from cifar_cli.train.run import train as run_training
    from cifar_cli.train.tracking import EpochHook
    from cifar_cli.ui.display import make_reporter
    from cifar_cli.ui.plots import confusion_matrix_figure

    sampler, pruner = options["sampler"] or "grid", options["pruner"] or "none"
    _refuse_local_only(seeds, options)
    dimensions = [space.parse_dimension(axis) for axis in axes]
    varied = [d for d in dimensions if len(d.values) > 1]
    if not varied:
        raise UsageError("Nothing to draw.", hint="Give at least one --set key=v1,v2 (or range/log) to sweep.")
    fixed = {d.key: d.values[0] for d in dimensions if len(d.values) == 1} | {"train.seed": seeds[0]}
    grid = space.grid_points(varied)
    count = _trial_count(options["trials"], sampler, len(grid))
    val_images = sweeps.validation_images(base)

    def build(trial: Any) -> Settings:
        return sweeps.trial_settings(trial, config, build_fixed, sweep_name, val_images)

    # Every bad value in one table before any trial: the grid, or each range's two ends.
    corners = (
        grid if sampler == "grid" else [{d.key: d.values[0] for d in varied}, {d.key: d.values[-1] for d in varied}]
    )
    checked = sweeps.check_all(
        [sweeps.Trial(i, {**c, **fixed}, tuple(c), f"check{i}") for i, c in enumerate(corners)], build
    )
    storage = space.open_storage(options["storage"])
    study = studies.open_study(
        storage,
        sweep_name,
        space.make_sampler(sampler, grid, seeds[0]),
        space.make_pruner(pruner, base.train.epochs),
        space.space_text(varied),
        studies.study_recipe(checked[0], [d.key for d in varied]),
    )
    folder = sweeps.sweep_folder(base, sweep_name)
    console.print(
        f"Study {sweep_name} in {_redacted(options['storage'])}: {count} trials, {sampler} sampler, pruner {pruner}, "
        f"ranked on {val_images:,} validation images; runs in {folder}."
    )
    for dimension in varied:
        console.print(f"  {space.describe_dimension(dimension, sampler)}")

    def train(settings: Settings, on_epoch: Any) -> None:
        reporter = EpochHook(make_reporter(settings.log.progress, console), on_epoch)
        run_training(settings, reporter, confusion_matrix_figure)

    plan = studies.StudyPlan(varied, fixed, count, parse_duration(options["timeout"]) if options["timeout"] else None)
    try:
        done = studies.run_worker(study, plan, studies.trial_runner(build, train), console.print)
    except TrainingInterrupted as stopped:  # Ctrl-C or a cluster's signal: the trial saved and is queued again
        raise stopped.reworded(
            f"Sweep interrupted. {stopped}",
            hint="The trial is queued again: this command (or any worker of the study) resumes it.",
        ) from None
    _write_results(studies, study, folder, [d.key for d in varied])
    running = sum(t.state.name == "RUNNING" for t in study.get_trials(deepcopy=False))
    console.print(
        f"This worker: {done['finished']} finished, {done['pruned']} pruned, {done['taken over']} taken over from "
        "workers that died." + (f" {running} trial(s) still running elsewhere." if running else "")
    )


def _write_results(studies: Any, study: Any, folder: Path, keys: list[str]) -> None:
    """The whole study (every worker's trials, read from the storage) ranked, written, drawn and printed."""
    from cifar_cli.cli.sweep_tables import publish_results

    trials, summaries, pruned = studies.study_results(study)
    publish_results(trials, summaries, folder, keys, {"study": study.study_name, "pruned": pruned})
    if pruned:
        named = ", ".join(f"{row['run']} (epoch {row['epochs']})" for row in pruned[:3])
        more = f" and {len(pruned) - 3} more" if len(pruned) > 3 else ""
        console.print(f"{len(pruned)} trial(s) pruned, not ranked: {named}{more} (all in sweep.json).")


def _refuse_local_only(seeds: list[int], options: dict[str, Any]) -> None:
    rows = []
    if len(seeds) > 1:
        rows.append(("--seeds", "one seed: each trial of a study is one run", ",".join(map(str, seeds))))
    if options["samples"] is not None:
        rows.append(("--samples", "use --trials N with --sampler random", str(options["samples"])))
    if options["jobs"] != 1:
        rows.append(("--jobs", "1: start more `cifar sweep --storage` workers instead", str(options["jobs"])))
    if rows:
        raise SettingsError("Options the local sweep reads, not a shared study.", rows)


def _trial_count(trials: int | None, sampler: str, grid_size: int) -> int:
    if sampler == "grid":
        if trials is not None and trials > grid_size:
            raise SettingsError(
                "Too many trials.", [("--trials", f"at most the grid's {grid_size} points", str(trials))]
            )
        return trials or grid_size
    if trials is None:
        raise SettingsError("How many trials?", [("--trials", f"a number of draws for --sampler {sampler}", "missing")])
    return trials


def _redacted(url: str) -> str:
    """A storage URL with its password hidden, for printing."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)
