"""A run directory as a run holds it: where it is, the checkpoint it resumes from, its status; and which of the
processes of a multi-GPU run writes it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.runs.status import RunStatus


@dataclass
class RunDir:
    path: Path
    resume_from: str | None
    status: RunStatus
    supervised: bool = False  # rank 0 of a multi-process run: a failure is its supervisor's to record


def is_main_process() -> bool:
    """Under torchrun / accelerate every process trains, but only rank 0 writes the run directory's files."""
    return int(os.environ.get("RANK", "0")) == 0
