"""What every command shares: how it is described, and the exit code of a user's mistake. The words a command
takes for itself are read by ``engine.config.argv``, which the TUI's forms use too."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

EXIT_USER_ERROR = 2


@dataclasses.dataclass
class Command:
    run: Callable[[list[str]], int]
    summary: str
    usage: str
    takes_config: bool = False
