"""The one error type for the user's mistakes: the CLI prints its message as one line and exits non-zero."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_MARKERS = ("No space left on device", "StorageFull", "os error 28", "file write failed",
                     "Disk quota exceeded", "iostream error", "unexpected pos")  # the last two: torch.save's words
NEARLY_FULL_BYTES = 1 << 20


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


def disk_full(exc: BaseException | None, path: Path) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk: its errno, the words the writing libraries (pyarrow,
    safetensors, torch.save) use, or no space left now on the device that holds ``path``."""
    try:
        if shutil.disk_usage(path).free < NEARLY_FULL_BYTES:
            return True
    except OSError:
        pass
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(marker in str(exc) for marker in DISK_FULL_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
