"""`cifar prepare`: an archive, an image folder or a CSV list into PNG folders and the tensor cache."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from cifar_cli.cli.common import (
    ConfigOption,
    DatasetOption,
    LabelSetOption,
    ProcessedDirOption,
    RawDirOption,
    SetOption,
    Sets,
    console,
    error_console,
    flag_settings,
    resolve,
)
from cifar_cli.errors import UsageError


def prepare(
    dataset: DatasetOption = None,
    label_set: LabelSetOption = None,
    from_folder: Annotated[
        Path | None,
        typer.Option(
            "--from-folder",
            help="Prepare your own images: DIR/<class>/*.{png,jpg,jpeg,webp,bmp}, or DIR/train/<class>/... and "
            "DIR/test/<class>/... (sets --dataset folder).",
        ),
        Sets("data.folder"),
    ] = None,
    from_csv: Annotated[
        Path | None,
        typer.Option(
            "--from-csv",
            help="Prepare the images a CSV lists: columns path,label and optionally split (train/test); paths "
            "relative to the CSV's folder (or --root) or absolute (sets --dataset folder).",
        ),
        Sets("data.csv_file"),
    ] = None,
    from_parquet: Annotated[
        Path | None,
        typer.Option(
            "--from-parquet",
            help="Prepare parquet files as the Hugging Face Hub keeps data sets (a folder or a file): an image "
            "column (the {bytes, path} struct or binary), a label column, splits from the file names (train-*, "
            "test-*) (sets --dataset folder; needs pyarrow).",
        ),
        Sets("data.parquet"),
    ] = None,
    image_column: Annotated[
        str | None, typer.Option("--image-column", help="--from-parquet: the image column."), Sets("data.image_column")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option("--label-column", help="--from-parquet: the label column."), Sets("data.label_column")
    ] = None,
    split_column: Annotated[
        str | None,
        typer.Option("--split-column", help="--from-parquet: a column of train/test instead of the file names."),
        Sets("data.split_column"),
    ] = None,
    validation_split: Annotated[
        str | None,
        typer.Option("--validation-split", help="--from-parquet: validation-* files join train, test or skip."),
        Sets("data.parquet_validation"),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option("--root", help="--from-csv: the folder relative paths start from (default: the CSV's)."),
        Sets("data.csv_root"),
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option("--test-fraction", help="Folder without test/: share of each class held out (default 0.2)."),
        Sets("data.test_fraction"),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", help="Folder images are resized to this square size in pixels (default 32)."),
        Sets("data.image_size"),
    ] = None,
    skip_bad_images: Annotated[
        bool | None,
        typer.Option("--skip-bad-images", help="Skip unreadable images (counted) instead of stopping at the first."),
        Sets("data.skip_bad_images"),
    ] = None,
    raw_dir: RawDirOption = None,
    processed_dir: ProcessedDirOption = None,
    no_png: Annotated[
        bool | None,
        typer.Option("--no-png", help="Only write the tensor cache, no PNG folders."),
        Sets("data.write_png", invert=True),
    ] = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Extract the archive safely (or read an image folder or a CSV list) and write PNG-per-class folders plus a
    tensor cache."""
    from cifar_cli.data import prepare_for

    flags = flag_settings(prepare, locals())
    sources = {"data.folder": from_folder, "data.csv_file": from_csv, "data.parquet": from_parquet}
    if sum(path is not None for path in sources.values()) > 1:
        raise UsageError("Give one of --from-folder, --from-csv and --from-parquet.")
    if any(path is not None for path in sources.values()):
        flags["data.dataset"] = "folder"
        # The source named on the command line is the only one: another in settings.yaml would win.
        flags.update({key: None for key, path in sources.items() if path is None})
    data = resolve(config, set_options, flags).data
    with count_progress() as on_progress:
        result = prepare_for(data, on_progress=on_progress)
    for note in result.notes:
        error_console.print(Text(note, style="yellow"))
    counts = ", ".join(f"{count:,} {split}" for split, count in result.counts.items())
    spec = result.spec
    what = f"{counts} images, {spec.num_classes} classes, {spec.image_size} x {spec.image_size}"
    print_class_counts(result.per_class)
    if result.already_prepared:
        console.print(f"Already prepared in {result.processed_dir} ({what}). Nothing to do.")
    else:
        console.print(f"Prepared {what} in {result.processed_dir}.")


@contextlib.contextmanager
def count_progress() -> Iterator[Any]:
    """One bar per stage (reading, writing PNGs...) on stderr, only on a terminal."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} images"),
        console=error_console,
        transient=True,
        disable=not error_console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done)

    with progress:
        yield on_progress


COUNTED_CLASSES = 20  # up to this many classes, a table of every class's images; beyond, the extremes


def print_class_counts(per_class: dict[str, dict[str, int]]) -> None:
    """Images per class and split, and a warning on stderr where the training split is imbalanced."""
    from cifar_cli.data.balance import class_balance, imbalance_warning

    train = per_class.get("train", {})
    if not train:
        return
    splits = list(per_class)
    if len(train) <= COUNTED_CLASSES:
        table = Table("class", title="Images per class", title_justify="left")
        for split in splits:
            table.add_column(split, justify="right")
        for name in train:
            table.add_row(name, *[f"{per_class[split].get(name, 0):,}" for split in splits])
        console.print(table)
    else:
        balance = class_balance(train)
        console.print(
            f"Images per class (train): {balance.smallest[1]:,} ({balance.smallest[0]}) to {balance.largest[1]:,} "
            f"({balance.largest[0]}); every count is in the manifest."
        )
    warning = imbalance_warning(train)
    if warning:
        error_console.print(Text(warning, style="yellow"))
