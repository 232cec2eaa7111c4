"""One exception type for every problem a user can fix: the CLI turns it into a short message and an exit code."""

from __future__ import annotations


class CifarError(Exception):
    """A failure with a message for people, an optional hint, and the exit code the CLI should use."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(CifarError):
    """Bad input given by the user (settings, flags, files that are not what they claim): exit code 2."""

    exit_code = 2


class SettingsError(UsageError):
    """Settings that failed validation: carries (field, problem, given value) rows for a table."""

    def __init__(self, message: str, rows: list[tuple[str, str, str]], hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.rows = rows
