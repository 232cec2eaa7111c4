"""`cifar plot`: training curves, confusion matrix, per-class accuracy and sample predictions as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cifar_cli.cli.common import (
    CheckpointDirOption,
    CheckpointProcessedDirOption,
    CheckpointRawDirOption,
    ConfigOption,
    DeviceOption,
    LogDirOption,
    SetOption,
    console,
    error_console,
    flag_settings,
    given_data_settings,
    resolve,
)


def plot(
    target: Annotated[
        Path | None, typer.Argument(help="A run folder (log_dir/<run>) or a checkpoint; default: the latest run.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for the PNG files (default: <run>/plots).")] = None,
    device: DeviceOption = None,
    log_dir: LogDirOption = None,
    checkpoint_dir: CheckpointDirOption = None,
    processed_dir: CheckpointProcessedDirOption = None,
    raw_dir: CheckpointRawDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Training curves, confusion matrix, per-class accuracy and sample predictions as PNG files."""
    flags = flag_settings(plot, locals())
    settings = resolve(config, set_options, flags)
    from cifar_cli.ui.plots import write_run_plots

    written = write_run_plots(
        target,
        out,
        settings.log.log_dir,
        settings.log.checkpoint_dir,
        settings.data,
        settings.train.device,
        say=error_console.print,
        keep_data=given_data_settings(set_options, flags),
    )
    console.print("Wrote:\n" + "\n".join(f"  {path}" for path in written))
