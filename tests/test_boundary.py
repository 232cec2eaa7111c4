"""The CLI's one error boundary: every command wrapped once, known errors as messages, unexpected ones as one line
with the way to their traceback, out-of-memory with the settings that lower it, a closed pipe ended quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cifar_cli.cli import app
from cifar_cli.cli.boundary import error_boundary
from cifar_cli.errors import DEBUG_VARIABLE, ExitCode, UsageError
from tests.conftest import flat, run_cli


def _app_raising(error: BaseException) -> typer.Typer:
    """A one-command app whose command fails with `error`, registered as `cifar` registers its commands."""
    boundary_app = typer.Typer(pretty_exceptions_enable=False)

    def fail(size: int = 1) -> None:
        raise error

    boundary_app.command("fail")(error_boundary(fail))
    boundary_app.command("other")(lambda: None)  # two commands: Typer keeps the command name on the line
    return boundary_app


def test_every_command_is_registered_behind_the_boundary() -> None:
    callbacks = [command.callback for command in app.registered_commands]
    callbacks += [
        command.callback for group in app.registered_groups for command in group.typer_instance.registered_commands
    ]
    assert len(callbacks) >= 12
    for callback in callbacks:
        assert getattr(callback, "__wrapped__", None) is not None, callback.__name__


def test_an_unexpected_error_is_one_message_with_the_way_to_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_VARIABLE)
    result = CliRunner().invoke(_app_raising(ValueError("the widget is bent\nsecond line")), ["fail"])
    assert result.exit_code == ExitCode.ERROR and isinstance(result.exception, SystemExit)
    text = flat(result.output)
    assert "Unexpected error: ValueError: the widget is bent" in text and "second line" not in text
    assert f"{DEBUG_VARIABLE}=1" in text
    monkeypatch.setenv(DEBUG_VARIABLE, "1")  # the traceback, for a bug report
    debug = CliRunner().invoke(_app_raising(ValueError("the widget is bent")), ["fail"])
    assert isinstance(debug.exception, ValueError)


def test_known_errors_keep_their_exit_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_VARIABLE)
    usage = CliRunner().invoke(_app_raising(UsageError("bad flag", hint="use another")), ["fail"])
    assert usage.exit_code == ExitCode.USAGE and "bad flag" in usage.output and "use another" in usage.output
    interrupted = CliRunner().invoke(_app_raising(KeyboardInterrupt()), ["fail"])
    assert interrupted.exit_code == ExitCode.INTERRUPTED and "Interrupted." in interrupted.output


def test_running_out_of_memory_names_the_settings_that_lower_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.delenv(DEBUG_VARIABLE)
    try:
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses it
    except RuntimeError as error:
        refused = error
    else:
        pytest.skip("this machine promised a petabyte")
    for error in (refused, MemoryError()):
        result = CliRunner().invoke(_app_raising(error), ["fail"])
        text = flat(result.output)
        assert result.exit_code == ExitCode.ERROR and "Out of memory" in text, text
        assert "--batch-size" in text and "train.micro_batch_size" in text and "Unexpected" not in text


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    """`cifar config show | head -0`: a real pipe whose reader is gone before the command writes."""
    env = {key: value for key, value in os.environ.items() if key != DEBUG_VARIABLE}
    process = subprocess.Popen(
        [sys.executable, "-m", "cifar_cli", "config", "show"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env,
    )  # fmt: skip
    process.stdout.close()
    errors = process.stderr.read().decode()
    assert process.wait(timeout=120) == ExitCode.CLOSED_PIPE, errors
    assert errors == ""  # no traceback, no "Exception ignored ... BrokenPipeError"


def test_a_settings_file_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  # caf\u00e9 au lait\n  seed: 1\n".encode("latin-1"))
    result = run_cli("train", "--config", latin, "--dry-run")
    text = flat(result.output)
    assert result.exit_code == ExitCode.USAGE, text
    assert "is not UTF-8 text: byte 0xe9 on line 2" in text and "Save the file as UTF-8" in text


def test_a_settings_file_that_cannot_be_read_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads a file of mode 000, so the refusal of the operating system is played here.
    config = tmp_path / "locked.yaml"
    config.write_text("train:\n  seed: 1\n")
    original = Path.read_bytes

    def refused(path: Path) -> bytes:
        if path.name == config.name:
            raise PermissionError(13, "Permission denied")
        return original(path)

    monkeypatch.setattr(Path, "read_bytes", refused)
    result = run_cli("config", "show", "--config", config)
    assert result.exit_code == ExitCode.USAGE
    assert "locked.yaml cannot be read: Permission denied" in flat(result.output)
