"""How a worker's failure reads to the user: the engine's own message for the errors it raises on purpose, the
exception's type and text for anything else (which is then a bug worth reporting, still never a crash)."""

from __future__ import annotations

from engine.errors import ConfigError, UserError


def failure_text(error: BaseException | None) -> str:
    if isinstance(error, ConfigError):
        return "; ".join(error.problems)
    if isinstance(error, UserError):
        return str(error)
    return f"{type(error).__name__}: {error}"
