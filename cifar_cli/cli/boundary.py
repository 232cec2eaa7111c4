"""The one error boundary of the `cifar` command, wrapped around every command where the app registers it.

Known errors (`CifarError`) become a short panel and their exit code; Ctrl-C (and SIGTERM, SIGUSR1, SIGUSR2) exits
130, and a run stopped by a SLURM job's warning signal requeues the job; a reader that closed our
output pipe ends the command quietly; running out of memory names the settings that lower it; anything else is
one line naming the exception and how to see its traceback (`CIFAR_DEBUG=1`), exit 1.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from cifar_cli.cli.common import error_console, quiet_closed_stdout
from cifar_cli.errors import DEBUG_VARIABLE, CifarError, ExitCode, SettingsError, TrainingInterrupted
from cifar_cli.runtime import stopping

# What running out of memory looks like: Python's own, torch's CUDA/MPS error, and the CPU allocator's message.
OUT_OF_MEMORY_TYPES = ("MemoryError", "OutOfMemoryError")
OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")
MEMORY_HINT = (
    "Lower what a step holds: a smaller --batch-size (train.batch_size; train.eval_batch_size for evaluation), "
    "--set train.micro_batch_size=N (the same batch, in pieces of N images), a smaller model or "
    "--set model.width_multiplier=0.5, or --precision bf16 on a GPU."
)


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def error_boundary(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with every failure turned into a message and an exit code (Typer reads the signature through
    functools.wraps)."""

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            with stopping.stop_signals_raise():  # SIGTERM and SIGUSR1/2 stop a command as Ctrl-C does
                return command(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - this is the boundary
            if _from_the_framework(error):
                raise  # Typer's (or Click's) own exits and usage errors: it words them
            _end_with(error)

    return guarded


def _from_the_framework(error: BaseException) -> bool:
    """Typer's exits and parameter errors (Click's, in Typer versions that still build on Click)."""
    return any(kind.__module__.split(".")[0] in ("typer", "click") for kind in type(error).__mro__)


def _end_with(error: BaseException) -> NoReturn:
    if isinstance(error, SystemExit):
        raise error
    if isinstance(error, SettingsError):
        error_console.print(_settings_table(error))
        if error.hint:
            error_console.print(f"[dim]{error.hint}[/dim]")
        raise typer.Exit(error.exit_code)
    if isinstance(error, CifarError):
        error_console.print(_panel(error.message, error.hint))
        if isinstance(error, TrainingInterrupted) and error.requeue:  # last: after everything on the way out
            error_console.print(stopping.requeue_job())
        raise typer.Exit(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        signum = getattr(error, "signum", None)  # a stop signal other than Ctrl-C (runtime/stopping.py)
        error_console.print(f"Stopped by {stopping.signal_name(signum)}." if signum else "Interrupted.")
        raise typer.Exit(ExitCode.INTERRUPTED)
    if isinstance(error, BrokenPipeError):
        quiet_closed_stdout()
        raise typer.Exit(ExitCode.CLOSED_PIPE)
    if debugging() or not isinstance(error, Exception):
        raise error
    name = type(error).__name__
    if is_out_of_memory(error):
        error_console.print(_panel(f"Out of memory ({name}): {_first_line(error)}", MEMORY_HINT))
    else:
        error_console.print(
            _panel(
                f"Unexpected error: {name}: {_first_line(error)}",
                f"This is likely a bug in cifar. Run again with {DEBUG_VARIABLE}=1 to see the traceback, and "
                "include it when you report the problem.",
            )
        )
    raise typer.Exit(ExitCode.ERROR)


def is_out_of_memory(error: BaseException) -> bool:
    if type(error).__name__ in OUT_OF_MEMORY_TYPES:
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(words in text for words in OUT_OF_MEMORY_WORDS)


def flush_or_quiet() -> int | None:
    """Flush stdout at the very end; a reader that left early gets CLOSED_PIPE instead of a traceback."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        quiet_closed_stdout()
        return ExitCode.CLOSED_PIPE
    except (OSError, ValueError):
        return None
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else "(no message)"


def _panel(message: str, hint: str | None) -> Panel:
    # Text, not markup: messages quote user input ("[1,"); fold, not crop, so long paths stay whole.
    body = Text(message, overflow="fold")
    if hint:
        body.append(f"\n\n{hint}", style="dim")
    return Panel(body, title="cifar: error", title_align="left", border_style="red", expand=False)


def _settings_table(error: SettingsError) -> Table:
    table = Table("setting", "problem", "given", title=error.message, title_justify="left", border_style="red")
    for row in error.rows:
        table.add_row(*row)
    return table
