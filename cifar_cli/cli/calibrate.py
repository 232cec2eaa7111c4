"""`cifar calibrate`: a temperature for a checkpoint's probabilities, fitted on its run's validation split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cifar_cli.cli.common import (
    CheckpointProcessedDirOption,
    CheckpointRawDirOption,
    ConfigOption,
    DeviceOption,
    SetOption,
    console,
    error_console,
    flag_settings,
    given_data_settings,
    resolve,
)


def calibrate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint of a run that held out a validation split.")],
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")] = None,
    device: DeviceOption = None,
    raw_dir: CheckpointRawDirOption = None,
    processed_dir: CheckpointProcessedDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Fit temperature scaling on the run's validation split, store it in the checkpoint (predict and export use
    it), and report the test split's calibration error before and after."""
    flags = flag_settings(calibrate, locals())
    settings = resolve(config, set_options, flags)
    from cifar_cli.files import write_text_atomically
    from cifar_cli.predict.inference import checkpoint_data
    from cifar_cli.predict.temperature import calibrate_checkpoint

    data = checkpoint_data(checkpoint, settings.data, given_data_settings(set_options, flags))
    figures = calibrate_checkpoint(checkpoint, data, settings.train.device, say=error_console.print)
    table = Table(
        "test split", "before", "after", title=f"Temperature {figures['temperature']:.3f}", title_justify="left"
    )
    table.add_row("calibration error (ECE)", f"{figures['test_ece_before']:.2%}", f"{figures['test_ece_after']:.2%}")
    table.add_row("negative log-likelihood", f"{figures['test_nll_before']:.4f}", f"{figures['test_nll_after']:.4f}")
    console.print(table)
    console.print(
        f"Stored in {checkpoint}: `cifar predict` and `cifar export` use it (accuracy unchanged, "
        f"{figures['test_accuracy']:.2%})."
    )
    if json_file:
        write_text_atomically(json_file, json.dumps(figures, indent=2))
