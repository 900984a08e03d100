"""A run directory as a run holds it: where it is, the checkpoint it resumes from, its status."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.rundir.status import RunStatus


@dataclass
class RunDir:
    path: Path
    resume_from: str | None
    status: RunStatus
    supervised: bool = False  # rank 0 of a multi-process run: a failure is its supervisor's to record
