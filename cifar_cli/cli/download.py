"""`cifar download`: fetch an archive from mirrors or a local file, resume, verify."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from cifar_cli.cli.common import (
    ConfigOption,
    DatasetOption,
    LabelSetOption,
    RawDirOption,
    SetOption,
    Sets,
    console,
    error_console,
    flag_settings,
    resolve,
)


def download(
    dataset: DatasetOption = None,
    label_set: LabelSetOption = None,
    urls: Annotated[
        list[str] | None,
        typer.Option("--url", help="Mirror to try, in order: http(s)://, file:// or a path (repeatable)."),
        Sets("data.urls"),
    ] = None,
    md5: Annotated[
        str | None,
        typer.Option("--md5", help="Expected MD5 of the archive (default: the official archive's)."),
        Sets("data.md5"),
    ] = None,
    raw_dir: RawDirOption = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if a valid archive is present.")] = False,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Fetch the CIFAR-10 (or --dataset cifar100) python archive, resume partial downloads, verify its checksum."""
    from cifar_cli.data import download_for

    data = resolve(config, set_options, flag_settings(download, locals())).data
    with transfer_progress() as (on_progress, on_message):
        result = download_for(data, force=force, on_progress=on_progress, on_message=on_message)
    if result.already_present:
        console.print(f"Already downloaded and verified: {result.path} (md5 {result.md5}). Nothing to do.")
    else:
        console.print(f"Downloaded {result.path} from {result.source} (md5 {result.md5} verified).")


@contextlib.contextmanager
def transfer_progress() -> Iterator[tuple[Any, Any]]:
    """A byte-count bar on stderr (only on a terminal) and a way to print messages above it."""
    progress = Progress(
        TextColumn("[bold]download"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=error_console,
        transient=True,
        disable=not error_console.is_terminal,
    )
    task = progress.add_task("download", total=None)

    def on_progress(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield on_progress, progress.console.print
