"""The `cifar` command: one module per command (or family), each flags -> Settings -> one core call -> render.

Options shared by several commands, the consoles and the error handling live in `common.py`. The command reference
in docs/cli.md is generated from this app (`make docs`); a test fails when it is stale.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cifar_cli import __version__
from cifar_cli.cli.bench import bench
from cifar_cli.cli.boundary import error_boundary, flush_or_quiet
from cifar_cli.cli.calibrate import calibrate
from cifar_cli.cli.common import console
from cifar_cli.cli.config import config_app
from cifar_cli.cli.download import download
from cifar_cli.cli.evaluate import evaluate
from cifar_cli.cli.export import export_model
from cifar_cli.cli.plot import plot
from cifar_cli.cli.predict import predict
from cifar_cli.cli.prepare import prepare
from cifar_cli.cli.runs import runs
from cifar_cli.cli.sweep import sweep
from cifar_cli.cli.train import train
from cifar_cli.errors import ExitCode

app = typer.Typer(
    help="CIFAR-10 from nothing to a trained, evaluated, plotted classifier.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
COMMANDS = {
    "download": download,
    "prepare": prepare,
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "calibrate": calibrate,
    "export": export_model,
    "runs": runs,
    "sweep": sweep,
    "plot": plot,
    "bench": bench,
}
for name, command in COMMANDS.items():
    app.command(name)(error_boundary(command))
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        console.print(f"cifar {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """CIFAR-10 from nothing to a trained, evaluated, plotted classifier: download, prepare, train, evaluate, plot."""


def main() -> None:
    try:
        app(prog_name="cifar")  # ends with SystemExit(code) in Click's standalone mode
    except SystemExit as exit_:
        code = exit_.code
    else:
        code = ExitCode.OK
    # A reader that left early (`cifar runs | head -1`) makes the last flush fail: end quietly, not with a traceback.
    sys.exit(flush_or_quiet() or code)
