"""`cifar export`: a checkpoint as ONNX or a torch.export program, verified against it before it is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cifar_cli.cli.common import (
    CheckpointProcessedDirOption,
    CheckpointRawDirOption,
    ConfigOption,
    SetOption,
    console,
    error_console,
    flag_settings,
    given_data_settings,
    resolve,
)
from cifar_cli.errors import SettingsError


def export_model(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `cifar train` (last.pth).")],
    fmt: Annotated[
        str, typer.Option("--format", help="onnx (ONNX Runtime, everywhere) or pt2 (torch.export).")
    ] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", help="File to write (default: the checkpoint's name).")] = None,
    batch: Annotated[
        str, typer.Option("--batch", help="dynamic (any batch size) or a fixed batch size N.")
    ] = "dynamic",
    tta: Annotated[
        bool | None,
        typer.Option("--tta/--no-tta", help="Test-time augmentation inside the graph (default: as trained)."),
    ] = None,
    opset: Annotated[int | None, typer.Option("--opset", min=18, help="ONNX opset (default: torch's).")] = None,
    raw_dir: CheckpointRawDirOption = None,
    processed_dir: CheckpointProcessedDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """A model to ship: the checkpoint as ONNX or a torch.export program, verified against it before it is kept."""
    flags = flag_settings(export_model, locals())
    settings = resolve(config, set_options, flags)
    if batch != "dynamic" and not (batch.isdigit() and int(batch) > 0):
        raise SettingsError("Bad option.", [("--batch", "dynamic or a positive whole number", batch)])
    from cifar_cli.export.writer import export_checkpoint
    from cifar_cli.predict.inference import checkpoint_data

    data = checkpoint_data(checkpoint, settings.data, given_data_settings(set_options, flags))
    result = export_checkpoint(
        checkpoint, data, fmt, out, None if batch == "dynamic" else int(batch), tta, opset, say=error_console.print
    )
    size = result.contract["input"]["shape"][-1]
    console.print(
        f"Wrote {result.path} ({result.size_bytes / 1e6:.1f} MB). Verified against the checkpoint on "
        f"{result.verified_images} "
        f"test images: max |logit difference| {result.max_abs_difference:.2g} "
        f"({result.relative_difference:.2g} of the largest logit), top-1 agreement {result.top1_agreement:.2%}.\n"
        f"Test accuracy: exported {result.accuracy:.2%}, checkpoint {result.checkpoint_accuracy:.2%} "
        f"(TTA level {result.contract['tta_level']}).\n"
        f"Input: {result.contract['input']['name']}, float32 N x 3 x {size} x {size} RGB in [0, 1] "
        "(pixels / 255), normalisation inside; output: logits."
        + (
            f" Calibrated probabilities: softmax(logits / {result.contract['temperature']['value']:.4f}) (the "
            "temperature is in the contract; cifar predict applies it)."
            if result.contract.get("temperature")
            else ""
        )
    )
