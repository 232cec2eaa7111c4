"""`cifar predict`: the top classes of image files and folders, from a checkpoint or an exported model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cifar_cli.cli.common import DeviceOption, console, error_console, flag_settings, resolve
from cifar_cli.errors import SettingsError

TABLE_ROWS = 50  # rows printed to the terminal; the files (--csv, --json) always have every image
SKIPPED_SHOWN = 20


def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `cifar train`, or an export.")],
    paths: Annotated[
        list[Path],
        typer.Argument(help="Image files of any size (resized as in training), or folders (searched recursively)."),
    ],
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="Classes to show per image (at most the model's classes).")
    ] = 3,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Write path, top classes and probabilities to this CSV file.")
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Write the results as JSON to this file ('-': print them): {images: [...], skipped: [...]}."
        ),
    ] = None,
    explain: Annotated[
        Path | None,
        typer.Option("--explain", help="Write a Grad-CAM overlay per image into this folder (checkpoints only)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per inference batch.")] = 256,
    device: DeviceOption = None,
) -> None:
    """Top-k classes with probabilities for image files and folders (unreadable files are listed and skipped)."""
    from cifar_cli.files import write_text_atomically
    from cifar_cli.predict.classify import classify_files, collect_images, load_classifier

    device_name = resolve(None, None, flag_settings(predict, locals())).train.device
    files = collect_images(paths)
    classifier = load_classifier(checkpoint, device_name)
    if top_k > len(classifier.class_names):
        raise SettingsError(
            "Bad option.", [("--top-k", f"at most the model's {len(classifier.class_names)} classes", str(top_k))]
        )
    on_batch = explainer(classifier, explain, checkpoint) if explain is not None else None
    with file_progress(len(files)) as on_progress:
        result = classify_files(classifier, files, top_k, batch_size, on_progress, on_batch)
    report_skipped(result.skipped)
    if not result.rows:
        from cifar_cli.errors import UsageError

        raise UsageError(f"None of the {len(files):,} files could be read as an image.")
    if csv_file is not None:
        write_text_atomically(csv_file, csv_text(result.rows, top_k))
    if json_file is not None and str(json_file) != "-":
        write_text_atomically(json_file, json.dumps(json_document(result), indent=2))
    if json_file is not None and str(json_file) == "-":
        console.print_json(json.dumps(json_document(result)))  # what --json FILE holds: images and skipped
    elif csv_file is None and json_file is None:
        console.print(results_table(result.rows, top_k))
    else:
        written = [str(path) for path in (csv_file, json_file) if path is not None and str(path) != "-"]
        console.print(f"Classified {len(result.rows):,} images; wrote {' and '.join(written)}.")


def explainer(classifier: Any, folder: Path, checkpoint: Path) -> Any:
    """`on_batch` for --explain: a Grad-CAM overlay of each image's top class, named after the image."""
    from cifar_cli.errors import UsageError
    from cifar_cli.files import ensure_writable_folder
    from cifar_cli.predict.gradcam import gradcam, write_overlay

    if classifier.loaded is None:
        raise UsageError(
            f"{checkpoint} is an export: Grad-CAM needs the model's layers.",
            hint="Pass the checkpoint it was exported from.",
        )
    ensure_writable_folder(folder)
    used: set[str] = set()

    def on_batch(batch_paths: list[Path], images: Any, probabilities: Any) -> None:
        top = probabilities.argmax(dim=1)
        heat = gradcam(classifier.loaded.model, images, classifier.loaded.spec, top)
        for index, path in enumerate(batch_paths):
            name = unique_name(path.stem, used)
            caption = f"{classifier.class_names[int(top[index])]} {float(probabilities[index, top[index]]):.0%}"
            write_overlay(folder / f"{name}.png", images[index], heat[index], caption)

    return on_batch


def unique_name(stem: str, used: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`... where files of one name sit in several folders."""
    name, number = stem, 1
    while name in used:
        number += 1
        name = f"{stem}-{number}"
    used.add(name)
    return name


def file_progress(total: int) -> Any:
    """A bar on stderr, only on a terminal; yields the `on_progress(done, total)` callback."""
    import contextlib

    progress = Progress(
        TextColumn("[bold]Classifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=error_console,
        transient=True,
        disable=not error_console.is_terminal,
    )

    @contextlib.contextmanager
    def running() -> Any:
        task = progress.add_task("classify", total=total)
        with progress:
            yield lambda done, _total: progress.update(task, completed=done)

    return running()


def report_skipped(skipped: list[tuple[str, str]]) -> None:
    if not skipped:
        return
    error_console.print(f"Skipped {len(skipped):,} unreadable file(s):", style="yellow")
    for _path, why in skipped[:SKIPPED_SHOWN]:
        error_console.print(f"  {why}", style="yellow", soft_wrap=True)
    if len(skipped) > SKIPPED_SHOWN:
        error_console.print(f"  ... and {len(skipped) - SKIPPED_SHOWN:,} more (all listed in --json)", style="yellow")


def csv_text(rows: list[dict[str, Any]], top_k: int) -> str:
    """One row per image: path, then class and probability of each rank."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", *[f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("class", "probability")]])
    for row in rows:
        writer.writerow(
            [row["image"], *[value for t in row["top"] for value in (t["class"], f"{t['probability']:.6f}")]]
        )
    return buffer.getvalue()


def json_document(result: Any) -> dict[str, Any]:
    return {"images": result.rows, "skipped": [{"path": path, "error": why} for path, why in result.skipped]}


def results_table(rows: list[dict[str, Any]], top_k: int) -> Table:
    more = len(rows) - TABLE_ROWS
    caption = f"... and {more:,} more images: write them all with --csv FILE or --json FILE" if more > 0 else None
    table = Table("image", *[f"#{rank}" for rank in range(1, top_k + 1)], caption=caption, caption_justify="left")
    for row in rows[:TABLE_ROWS]:
        table.add_row(row["image"], *[f"{t['class']} {t['probability']:.1%}" for t in row["top"]])
    return table
