"""`python -m engine.cli`: the engine's commands without the TUI's."""

import sys

from engine.cli import main

sys.exit(main())
