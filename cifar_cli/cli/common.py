"""What every command shares: the consoles (a closed pipe ends them quietly), option declarations, flags -> Settings.

No torch code lives in `cli/`; heavy modules are imported inside the commands so `cifar --help` stays instant.
"""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cifar_cli.config.settings import Settings, load_settings, parse_set_options, set_dotted
from cifar_cli.errors import ExitCode


def quiet_closed_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of a closed pipe does not print a second
    BrokenPipeError on the way out (the recipe of Python's `signal` documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real descriptor (a test's captured output): nothing will flush there
        pass


class _Console(Console):
    """rich's console, but a reader that closed our pipe ends the command with its own exit code (rich's default
    exits 1, like any error)."""

    def on_broken_pipe(self) -> None:
        quiet_closed_stdout()
        raise SystemExit(ExitCode.CLOSED_PIPE)


console = _Console()
error_console = _Console(stderr=True)

# Help panels that group a command's options.
PATHS = "Paths"
RECIPE = "Recipe"
RUN = "Run"


@dataclass(frozen=True)
class Sets:
    """Marks a command-line option with the setting it overrides, in the option's own annotation: adding a flag is
    one parameter (`flag_settings` finds it)."""

    key: str
    invert: bool = False  # --no-png sets data.write_png to false


# Options shared by several commands, defined once.
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML settings file (default: ./settings.yaml when present).", rich_help_panel=RUN
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Any setting as dotted.key=value, e.g. optim.momentum=0.85 (repeatable).", rich_help_panel=RUN
    ),
]
DatasetOption = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="cifar10 or cifar100 (official archives), or folder (your images, see `cifar prepare --from-folder`). "
        "Default: whatever is prepared, else cifar10.",
    ),
    Sets("data.dataset"),
]
LabelSetOption = Annotated[
    str | None,
    typer.Option("--label-set", help="cifar100: fine (100 classes, default) or coarse (20 superclasses)."),
    Sets("data.label_set"),
]
RawDirOption = Annotated[
    Path | None,
    typer.Option("--raw-dir", help="Where the archive is downloaded.", rich_help_panel=PATHS),
    Sets("data.raw_data_dir"),
]
ProcessedDirOption = Annotated[
    Path | None,
    typer.Option("--processed-dir", help="Where PNG folders and the tensor cache go.", rich_help_panel=PATHS),
    Sets("data.processed_dir"),
]
# Commands that read a checkpoint use the data it was trained on unless a path is given.
CheckpointRawDirOption = Annotated[
    Path | None,
    typer.Option("--raw-dir", help="Where the archive is (default: the checkpoint's own).", rich_help_panel=PATHS),
    Sets("data.raw_data_dir"),
]
CheckpointProcessedDirOption = Annotated[
    Path | None,
    typer.Option(
        "--processed-dir",
        help="The prepared data (default: the data the checkpoint was trained on).",
        rich_help_panel=PATHS,
    ),
    Sets("data.processed_dir"),
]
CheckpointDirOption = Annotated[
    Path | None,
    typer.Option("--checkpoint-dir", help="Checkpoints go to <dir>/<run>/.", rich_help_panel=PATHS),
    Sets("log.checkpoint_dir"),
]
LogDirOption = Annotated[
    Path | None,
    typer.Option("--log-dir", help="TensorBoard logs and history go to <dir>/<run>/.", rich_help_panel=PATHS),
    Sets("log.log_dir"),
]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=RUN),
    Sets("train.device"),
]


def flag_settings(command: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """{setting: value} for the options of `command` that were given (None or an empty list: not given)."""
    given = {}
    for name, hint in typing.get_type_hints(command, include_extras=True).items():
        marker = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Sets)), None)
        value = arguments.get(name)
        if marker is not None and value not in (None, []):
            given[marker.key] = (not value) if marker.invert else value
    return given


def resolve(config: Path | None, set_options: list[str] | None, flags: dict[str, Any] | None = None) -> Settings:
    """Settings from every source; flags beat `--set`, which beats environment, YAML, preset and defaults."""
    overrides = parse_set_options(set_options or [])
    for key, value in (flags or {}).items():
        set_dotted(overrides, key, value)
    return load_settings(config, overrides)


def given_data_settings(set_options: list[str] | None, flags: dict[str, Any]) -> set[str]:
    """The data settings named on this command line (flags or --set), e.g. {"processed_dir", "urls"}: they win
    over what a checkpoint recorded of its data."""
    named = set(flags) | {option.split("=", 1)[0].strip() for option in set_options or []}
    return {key.split(".")[1] for key in named if key.startswith("data.") and key.count(".") >= 1}


def percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"
