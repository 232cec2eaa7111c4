"""The tables `cifar sweep` prints: every trial while they run, and the recipes ranked on validation accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from cifar_cli.cli.common import console
from cifar_cli.cli.runs import STATE_COLOURS
from cifar_cli.config.durations import format_duration


def trial_table(rows: list[Any]) -> Table:
    """Every trial: the settings that vary, state, epochs, validation and test accuracy, training time."""
    table = Table(title="Sweep", title_justify="left")
    table.add_column("trial", overflow="fold", ratio=1)
    table.add_column("state", no_wrap=True)
    table.add_column("epochs", justify="right", no_wrap=True)
    table.add_column("val", justify="right", no_wrap=True)
    table.add_column("test", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    for row in rows:
        values = " ".join(f"{key.split('.')[-1]}={row.trial.values[key]}" for key in (*row.trial.varied, "train.seed"))
        epochs = f"{row.epochs_done}/{row.epochs_planned}" if row.epochs_planned else str(row.epochs_done or "")
        name = Text(row.trial.name)
        name.append("\n" + values, style="dim")
        table.add_row(
            name,
            Text(row.state, style=STATE_COLOURS.get(row.state, "")),
            epochs,
            f"{row.val_accuracy:.2%}" if row.val_accuracy is not None else "",
            f"{row.test_accuracy:.2%}" if row.test_accuracy is not None else "",
            format_duration(row.seconds) if row.seconds else "",
        )
    return table


def publish_results(
    trials: list[Any], summaries: dict[str, Any], folder: Path, varied: list[str], extra: dict[str, Any] | None = None
) -> None:
    """Rank the trials, write sweep.json / sweep.csv and sweep.png into `folder`, and print the ranking: the end of a
    local sweep and of a shared study's worker alike."""
    from cifar_cli.sweep.grid import rank, write_results
    from cifar_cli.ui.plots import save_figure, sweep_figure

    ranked = rank(trials, summaries)
    document = write_results(folder, ranked, extra)
    save_figure(sweep_figure(document["recipes"], varied), folder / "sweep.png")
    print_sweep(ranked, document, folder)


def print_sweep(ranked: list[Any], document: dict[str, Any], folder: Path) -> None:
    table = Table(title="Ranked on validation accuracy", title_justify="left")
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("settings", overflow="fold", ratio=1)
    table.add_column("val accuracy (mean ± std)", justify="right", no_wrap=True)
    table.add_column("seeds", justify="right", no_wrap=True)
    for place, recipe in enumerate(ranked, start=1):
        spread = f" ± {recipe.val_std:.2%}" if recipe.val_std is not None else ""
        table.add_row(
            str(place),
            " ".join(f"{k}={_short(v)}" for k, v in recipe.values.items()) or "(fixed)",
            f"{recipe.val_mean:.2%}{spread}" if recipe.val_mean is not None else "not finished",
            str(len(recipe.trials)),
        )
    console.print(table)
    test = document["chosen_test_accuracy_mean"]
    if document["chosen"] is not None and test is not None:
        chosen = " ".join(f"{key}={value}" for key, value in document["chosen"].items())
        console.print(f"Chosen on validation: {chosen}. Its test accuracy, reported once: {test:.2%}.")
    console.print(f"Wrote {folder / 'sweep.csv'}, {folder / 'sweep.json'}, {folder / 'sweep.png'}.")


def _short(value: Any) -> str:
    """A drawn learning rate as 0.00137111, not 0.0013711093714978341 (the files keep every digit)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
