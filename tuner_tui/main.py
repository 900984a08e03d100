"""The `tuner` command: the engine's commands plus the ones that open the Textual app."""

from __future__ import annotations

import sys

from engine.cli import Command, main as engine_main
from engine.errors import UserError


def cmd_monitor(argv: list[str]) -> int:
    if len(argv) > 1:
        raise UserError(f"`tuner monitor` takes one run, got {' '.join(argv)}")
    from tuner_tui.monitor import run_monitor

    return run_monitor(argv[0] if argv else None)


TUI_COMMANDS = {
    "monitor": Command(cmd_monitor, "Open the live dashboard on a run (the latest when none is named).",
                       "tuner monitor [RUN]"),
}


def main(argv: list[str] | None = None) -> int:
    return engine_main(argv, extra=TUI_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
