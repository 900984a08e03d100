"""How a worker's failure reads to the user: the engine's own message for the errors it raises on purpose, the
exception's type and text for anything else (which is then a bug worth reporting, still never a crash)."""

from __future__ import annotations

from engine.errors import ConfigError, UserError
from engine.rundir.files import printable


def failure_text(error: BaseException | None) -> str:
    """The message, with terminal control sequences removed (it may quote a file: a dataset's role, a run's name)."""
    if isinstance(error, ConfigError):
        return printable("; ".join(error.problems))
    if isinstance(error, UserError):
        return printable(str(error))
    return printable(f"{type(error).__name__}: {error}")
