"""What the terminal app adds to the `tuner` command: the wizard (`tuner` alone, or `tuner --config FILE`) and the
dashboard (`tuner monitor [RUN]`). The engine's CLI finds this module through the package's entry point (group
``tuner.faces`` in pyproject.toml), so neither face imports the other; it is light to import, and Textual loads only
when one of its commands runs."""

from __future__ import annotations

import sys

from engine.errors import UserError


def monitor(argv: list[str]) -> int:
    if len(argv) > 1:
        raise UserError(f"`tuner monitor` takes one run, got {' '.join(argv)}")
    from tuner_tui.monitor import monitor_app

    line = monitor_app(argv[0] if argv else None).run()
    if line:  # the dashboard left a run going: say how to come back, now that the screen is the shell's again
        print(line)
    return 0


def wizard(argv: list[str]) -> int:
    """`tuner` with no command, or `tuner --config FILE` (the wizard prefilled from FILE)."""
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


# name: (run, summary, usage), as `tuner --help` lists them
COMMANDS = {"monitor": (monitor, "Open the live dashboard on a run (the latest when none is named).",
                        "tuner monitor [RUN]")}
DEFAULT = wizard  # what `tuner` runs with no command, or with --config FILE
