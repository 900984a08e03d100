"""Where things live: the bundled presets, the per-user cache and state directories."""

from __future__ import annotations

import os
from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


def cache_dir() -> Path:
    """Per-user cache (demo models, ...): ``$XDG_CACHE_HOME/tuner-tui``, by default ``~/.cache/tuner-tui``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuner-tui"


def state_dir() -> Path:
    """Per-user state (the index of runs, the wizard's last choices): ``$XDG_STATE_HOME/tuner-tui``."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "tuner-tui"
