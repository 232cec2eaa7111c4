"""`cifar train --seeds`: each seed's run, then the mean and standard deviation, as a table."""

from __future__ import annotations

from rich.table import Table

from cifar_cli.cli.common import console
from cifar_cli.train.seeds import SeedsSummary


def _number(value: float | None, form: str) -> str:
    return "" if value is None else format(value, form)


def print_seeds(summary: SeedsSummary) -> None:
    table = Table("seed", "run", "test accuracy", "train s", "wall s", title="Seeds", title_justify="left")
    table.columns[1].no_wrap = True
    for run in summary.runs:
        table.add_row(
            str(run.seed),
            run.run_name,
            _number(run.accuracy, ".2%"),
            _number(run.train_seconds, ".1f"),
            _number(run.wall_seconds, ".1f"),
        )
    console.print(table)
    accuracy, train, wall = (summary.stats(key) for key in ("accuracy", "train_seconds", "wall_seconds"))
    parts = [
        f"test accuracy {accuracy[0]:.2%} +- {accuracy[1]:.2%}" if accuracy else "",
        f"training {train[0]:.1f} +- {train[1]:.1f} s" if train else "",
        f"each run's command {wall[0]:.1f} +- {wall[1]:.1f} s" if wall else "",
    ]
    console.print(f"Mean +- std of {len(summary.runs)} seeds: {', '.join(part for part in parts if part)}.")
    console.print(f"Written to {summary.path}")
