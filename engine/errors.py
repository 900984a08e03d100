"""The one error type for the user's mistakes: the CLI prints its message as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad flag, a missing file, malformed data.

    ``message`` says what is wrong, ``hint`` (optional) what to do about it.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(UserError):
    """Several problems found at once in a configuration, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
