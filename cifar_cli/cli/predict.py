"""`cifar predict`: the top classes of image files, from a checkpoint or an exported model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cifar_cli.cli.common import DeviceOption, console, flag_settings, handled_errors, resolve


def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `cifar train`, or an export.")],
    images: Annotated[list[Path], typer.Argument(help="Image files of any size (resized as in training).")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=10, help="Classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: DeviceOption = None,
) -> None:
    """Top-k classes with probabilities for image files."""
    with handled_errors():
        from cifar_cli.engine.evaluate import predict_images

        device_name = resolve(None, None, flag_settings(predict, locals())).train.device
        results = predict_images(checkpoint, images, top_k, device_name)
        if as_json:
            console.print_json(json.dumps(results))
            return
        table = Table("image", *[f"#{rank}" for rank in range(1, top_k + 1)])
        for result in results:
            table.add_row(result["image"], *[f"{t['class']} {t['probability']:.1%}" for t in result["top"]])
        console.print(table)
