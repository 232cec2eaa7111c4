"""One exception type for every problem a user can fix, and the exit codes the CLI ends with, named once."""

from __future__ import annotations

from enum import IntEnum

DEBUG_VARIABLE = "CIFAR_DEBUG"  # set to 1: an unexpected error raises with its traceback instead of one line


class ExitCode(IntEnum):
    """What `cifar` returns to the shell; scripts and sweeps read these (e.g. a trial's 130 means "resume me")."""

    OK = 0
    ERROR = 1  # a failure that is not the input's fault (disk, network, a bug: see CIFAR_DEBUG=1)
    USAGE = 2  # bad input: settings, flags, files that are not what they claim
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): the run saved what it had and can be resumed
    CLOSED_PIPE = 141  # the reader of our output went away (`cifar runs | head -1`), as 128 + SIGPIPE


class CifarError(Exception):
    """A failure with a message for people, an optional hint, and the exit code the CLI should use."""

    exit_code: int = ExitCode.ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(CifarError):
    """Bad input given by the user (settings, flags, files that are not what they claim): exit code 2."""

    exit_code = ExitCode.USAGE


class SettingsError(UsageError):
    """Settings that failed validation: carries (field, problem, given value) rows for a table."""

    def __init__(self, message: str, rows: list[tuple[str, str, str]], hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.rows = rows


class TrainingInterrupted(CifarError):
    """A run (or a sweep, or a --seeds series) stopped by Ctrl-C or a cluster's signal after saving what it had:
    the same command resumes it. `requeue`: the signal was a SLURM job's warning of its end, so the command's
    boundary puts the job back in its queue once everything on the way out is done (runtime/stopping.py)."""

    exit_code = ExitCode.INTERRUPTED

    def __init__(self, message: str, hint: str | None = None, *, requeue: bool = False) -> None:
        super().__init__(message, hint)
        self.requeue = requeue

    def reworded(self, message: str, hint: str | None) -> TrainingInterrupted:
        """The same stop, told in the words of the command around the run."""
        return TrainingInterrupted(message, hint, requeue=self.requeue)
