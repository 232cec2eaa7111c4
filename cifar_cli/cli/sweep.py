"""`cifar sweep`: a grid (or random draws) of recipes trained as ordinary runs, ranked on validation accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cifar_cli.cli.common import (
    CheckpointDirOption,
    ConfigOption,
    DeviceOption,
    LogDirOption,
    ProcessedDirOption,
    RawDirOption,
    Sets,
    console,
    flag_settings,
    resolve,
)
from cifar_cli.cli.sweep_tables import publish_results, trial_table
from cifar_cli.config.settings import Settings, set_dotted
from cifar_cli.errors import CifarError, SettingsError


def sweep(
    axes: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A setting and its values: key=v1,v2,v3, key=range(a,b,step) or key=log(a,b,n) (repeatable; "
            "the Cartesian product is swept; one value: fixed).",
        ),
    ] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds of every recipe, e.g. 0,1,2 or 0-2.")] = "0",
    samples: Annotated[
        int | None, typer.Option("--samples", min=1, help="N seeded random draws from the grid instead of all.")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            "--study",
            help="Sweep folder name, and the study's name with --storage (default: the varied keys).",
        ),
    ] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="The recipe swept around."), Sets("preset")] = None,
    model: Annotated[str | None, typer.Option("--model"), Sets("model.name")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs"), Sets("train.epochs")] = None,
    time_budget: Annotated[
        str | None, typer.Option("--time-budget", help="Each trial's budget, e.g. 3m."), Sets("train.time_budget")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Share an Optuna study (the optuna extra): sqlite:///sweep.db, postgresql://user@host/db or a "
            "journal file on a shared disk (sweep.journal). Every `cifar sweep` with the same --storage and name "
            "is one more worker.",
        ),
    ] = None,
    trials: Annotated[
        int | None,
        typer.Option("--trials", min=1, help="Trials in the whole study (with --storage; default: the grid)."),
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            "--sampler", help="With --storage: grid (every point), random (seeded draws) or tpe (model-based)."
        ),
    ] = None,
    pruner: Annotated[
        str | None,
        typer.Option(
            "--pruner",
            help="With --storage: none, halving (successive halving) or hyperband, on each epoch's validation "
            "accuracy.",
        ),
    ] = None,
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="With --storage: start no new trial after this long, e.g. 30m.")
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            help="Trials at once, each in its own process with the cores split between them (one "
            "GPU each on a machine with several). Default 1: one after another, each with the machine to itself.",
        ),
    ] = 1,
    device: DeviceOption = None,
    raw_dir: RawDirOption = None,
    processed_dir: ProcessedDirOption = None,
    checkpoint_dir: CheckpointDirOption = None,
    log_dir: LogDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Train a grid (or random draws) of recipes as ordinary runs and rank them on validation accuracy."""
    from cifar_cli.sweep import grid as sweeps
    from cifar_cli.sweep.axes import parse_axis
    from cifar_cli.train.run import TrainingInterrupted
    from cifar_cli.train.run import train as run_training
    from cifar_cli.train.seeds import parse_seeds
    from cifar_cli.ui.display import make_reporter
    from cifar_cli.ui.plots import confusion_matrix_figure

    fixed: dict[str, Any] = {}
    for key, value in flag_settings(sweep, locals()).items():
        set_dotted(fixed, key, value)
    parsed = [parse_axis(axis) for axis in axes or []]
    seed_list = parse_seeds(seeds)  # as `cifar train --seeds` reads them: 0,1,2 or 0-2
    base = resolve(config, None, flag_settings(sweep, locals()))
    sweep_name = name or sweeps.default_name(parsed)
    _check_choices(sampler, pruner)
    if storage is not None:
        from cifar_cli.cli.sweep_study import run_study

        options = {
            "storage": storage,
            "trials": trials,
            "sampler": sampler,
            "pruner": pruner,
            "timeout": timeout,
            "samples": samples,
            "jobs": jobs,
        }
        run_study(axes or [], seed_list, options, base, fixed, config, sweep_name)
        return
    from cifar_cli.cli.sweep_study import check_local_options

    check_local_options(trials, sampler, pruner, timeout)
    trials = sweeps.plan_trials(parsed, seed_list, samples)
    val_images = sweeps.validation_images(base)
    built = sweeps.check_all(trials, lambda t: sweeps.trial_settings(t, config, fixed, sweep_name, val_images))
    folder = sweeps.sweep_folder(base, sweep_name)
    sweeps.check_earlier_trials(trials, built, folder)  # a rerun reuses trials only for the same question
    console.print(f"Sweep {sweep_name}: {len(trials)} trials in {folder}, ranked on {val_images:,} validation images.")

    def train_one(settings: Settings) -> None:
        run_training(settings, make_reporter(settings.log.progress, console), confusion_matrix_figure)

    if jobs == 1:
        try:
            summaries = sweeps.run_trials(
                trials, built, folder, train_one, console.print, lambda rows: console.print(trial_table(rows))
            )
        except TrainingInterrupted as error:
            raise error.reworded(
                f"Sweep interrupted. {error.message}",
                hint="Run the same `cifar sweep` command again: finished trials are skipped, this one resumes.",
            ) from None
    else:
        summaries = parallel_sweep(sweeps, trials, built, folder, jobs, base.train)
    publish_results(trials, summaries, folder, [key for key, values in parsed if len(values) > 1])


def _check_choices(sampler: str | None, pruner: str | None) -> None:
    from cifar_cli.sweep.space import PRUNERS, SAMPLERS

    rows = [
        (flag, f"one of {', '.join(choices)}", value)
        for flag, value, choices in (("--sampler", sampler, SAMPLERS), ("--pruner", pruner, PRUNERS))
        if value not in (None, *choices)
    ]
    if rows:
        raise SettingsError("Bad option.", rows)


def parallel_sweep(
    sweeps: Any, trials: list[Any], built: list[Settings], folder: Path, jobs: int, train: Any
) -> dict[str, Any]:
    """--jobs N: trials in their own processes, a live table of all of them; failed trials named with their log."""
    from rich.live import Live

    slots = sweeps.machine_slots(jobs, train.device)
    gpus = sum(slot.gpu is not None for slot in slots)
    console.print(
        f"{len(slots)} trials at a time, {slots[0].threads} CPU threads each"
        + (f", one GPU each ({gpus} GPUs)" if gpus else "")
        + f"; trial output in {folder / sweeps.TRIALS_FOLDER}."
    )
    with Live(console=console, auto_refresh=False, transient=False) as live:

        def show(rows: list[Any]) -> None:
            live.update(trial_table(rows), refresh=True)

        try:
            statuses = sweeps.run_parallel(trials, built, folder, slots, show)
        except KeyboardInterrupt as interrupt:  # Ctrl-C, or a stop signal (runtime/stopping.py)
            from cifar_cli.runtime.stopping import asks_requeue
            from cifar_cli.train.run import TrainingInterrupted

            raise TrainingInterrupted(
                "Sweep interrupted: every running trial saved its checkpoint.",
                hint="Run the same command again to skip finished trials and resume the others.",
                requeue=asks_requeue(getattr(interrupt, "signum", None), train.requeue_signal),
            ) from None
    console.print()  # a live display that is not a terminal ends without a line break
    failed = [status for status in statuses if status.state == "failed"]
    if failed:
        raise CifarError(
            f"{len(failed)} trial(s) failed: " + ", ".join(f"{s.trial.name} (log {s.log})" for s in failed) + ".",
            hint="Read the logs; the same command again retries them and skips finished trials.",
        )
    return sweeps.summaries_of(folder)
