"""`cifar runs`: one line per run (then each sweep's trials), readable in an 80-column terminal."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from cifar_cli.cli.common import ConfigOption, LogDirOption, SetOption, console, flag_settings, percent, resolve
from cifar_cli.config.durations import format_duration

STATE_COLOURS = {"running": "cyan", "finished": "green", "failed": "red", "interrupted": "yellow", "pruned": "magenta"}


def runs(
    log_dir: LogDirOption = None,
    sort: Annotated[
        str, typer.Option("--sort", help="name, val_accuracy, test_accuracy, seconds or epochs_done.")
    ] = "name",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (every setting that differs, preset, model) instead.")
    ] = False,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """One line per run: the settings that differ between runs, epochs, validation and test accuracy, state.
    Sweep trials (log_dir/sweeps/<sweep>/) follow, a table per sweep."""
    settings = resolve(config, set_options, flag_settings(runs, locals()))
    from cifar_cli.runs import SWEEPS_FOLDER, list_runs

    found = list_runs(settings.log.log_dir, sort)
    if as_json:
        console.print_json(json.dumps([run.to_json() for run in found]))
        return
    log_dir = settings.log.log_dir
    sweeps = sorted({run.sweep for run in found if run.sweep is not None})
    plain = [run for run in found if run.sweep is None]
    if plain or not sweeps:
        console.print(runs_table(plain, f"Runs in {log_dir}"))
    for sweep in sweeps:
        trials = [run for run in found if run.sweep == sweep]
        console.print(runs_table(trials, f"Sweep {sweep} ({log_dir / SWEEPS_FOLDER / sweep})"))


def runs_table(found: list[Any], title: str) -> Table:
    """Six short columns; the settings in which a run differs from the others sit under its name, wrapped, never
    cut (`--json` has them all, with the preset and model)."""
    table = Table(title=title, title_justify="left")
    table.add_column("run (settings that differ)", overflow="fold", ratio=1)
    table.add_column("epochs", justify="right", no_wrap=True)
    table.add_column("val", justify="right", no_wrap=True)
    table.add_column("test", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for run in found:
        name = Text(run.name)
        differing = short_settings(run.differing)
        if differing:
            name.append("\n" + differing, style="dim")
        table.add_row(
            name,
            f"{run.epochs_done}/{run.epochs_planned or '?'}",
            percent(run.val_accuracy),
            percent(run.test_accuracy),
            format_duration(run.seconds),
            Text(run.state, style=STATE_COLOURS.get(run.state, "")),
        )
    return table


def short_settings(settings: dict[str, Any]) -> str:
    """`optim.lr=0.1 optim.weight_decay=5e-4` as `lr=0.1 weight_decay=0.0005`: the last part of each key, or the
    whole key where two would read the same."""
    last_parts = [key.split(".")[-1] for key in settings]
    return " ".join(
        f"{short if last_parts.count(short) == 1 else key}={value}"
        for (key, value), short in zip(settings.items(), last_parts)
    )
