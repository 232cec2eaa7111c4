"""`cifar config show`: the resolved settings, as every command would see them."""

from __future__ import annotations

import typer

from cifar_cli.cli.boundary import error_boundary
from cifar_cli.cli.common import ConfigOption, SetOption, console, resolve
from cifar_cli.config.settings import dump_yaml

config_app = typer.Typer(help="Inspect the resolved settings.", no_args_is_help=True)


def config_show(config: ConfigOption = None, set_options: SetOption = None) -> None:
    """Print the resolved settings as YAML (defaults < preset < YAML < environment < --set)."""
    console.print(dump_yaml(resolve(config, set_options)), end="", highlight=False, markup=False)


config_app.command("show")(error_boundary(config_show))
