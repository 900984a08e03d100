"""The `tuner` command: the engine's commands plus the ones that open the Textual app."""

from __future__ import annotations

import os
import sys

from engine.cli import Command, main as engine_main
from engine.errors import UserError


def cmd_monitor(argv: list[str]) -> int:
    if len(argv) > 1:
        raise UserError(f"`tuner monitor` takes one run, got {' '.join(argv)}")
    from tuner_tui.monitor import monitor_app

    line = monitor_app(argv[0] if argv else None).run()
    if line:  # the dashboard left a run going: say how to come back, now that the screen is the shell's again
        print(line)
    return 0


TUI_COMMANDS = {
    "monitor": Command(cmd_monitor, "Open the live dashboard on a run (the latest when none is named).",
                       "tuner monitor [RUN]"),
}


def main(argv: list[str] | None = None) -> int:
    """No arguments open the wizard; `tuner --config run.yaml` opens it prefilled; anything else is a command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "--config" or argv[0].startswith("--config="):
        return _wizard(argv)
    return engine_main(argv, extra=TUI_COMMANDS)


def cli() -> None:
    """The `tuner` executable: ``main``, then, after a screen that loaded a model (chat), an exit that skips the
    interpreter's seconds-long teardown of torch; the screen is closed and every run is its own process by then."""
    tui = not sys.argv[1:] or sys.argv[1] in TUI_COMMANDS or sys.argv[1].startswith("--config")
    code = main()
    if tui and "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _wizard(argv: list[str]) -> int:
    path = argv[0].partition("=")[2] if argv and "=" in argv[0] else (argv[1] if len(argv) > 1 else None)
    if argv and (not path or len(argv) > (1 if "=" in argv[0] else 2)):
        print("tuner: error: `tuner --config FILE` takes one config file", file=sys.stderr)
        return 2
    from tuner_tui.wizard.app import run_wizard

    try:
        return run_wizard(path)
    except UserError as exc:
        lines = exc.problems if hasattr(exc, "problems") else [str(exc)]
        for line in lines:
            print(f"tuner: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    cli()
