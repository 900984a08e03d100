"""The checkpoints of a run directory, and which of them are whole.

The Trainer writes a checkpoint's weights first and ``trainer_state.json`` last, so a save cut short (kill -9, a
full disk) leaves a ``checkpoint-N`` without a readable state: such a one is never resumed from.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from engine.runs.files import read_json

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "adapter_model.bin", "pytorch_model.bin")


def checkpoints(run_dir: Path) -> list[Path]:
    """Every ``checkpoint-N`` directory (links excluded), oldest first."""
    try:
        found = [p for p in Path(run_dir).iterdir() if _CHECKPOINT.match(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(_CHECKPOINT.match(Path(path).name).group(1))


def is_complete(checkpoint: Path) -> bool:
    """Weights present and ``trainer_state.json`` readable with the checkpoint's own step."""
    checkpoint = Path(checkpoint)
    if not any((checkpoint / name).is_file() for name in WEIGHT_FILES):
        return False
    try:
        state = read_json(checkpoint / "trainer_state.json", max_bytes=1 << 30, nan=True)
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step_of(checkpoint)


def last_complete(run_dir: Path) -> Path | None:
    """The newest whole checkpoint (transformers' ``get_last_checkpoint`` with a validity check), or None."""
    for checkpoint in reversed(checkpoints(run_dir)):
        if is_complete(checkpoint):
            return checkpoint
    return None


def newer_incomplete(run_dir: Path, than: Path | None) -> list[Path]:
    """The checkpoints after ``than`` (all, when None) whose save was cut short."""
    after = step_of(than) if than else -1
    return [c for c in checkpoints(run_dir) if step_of(c) > after and not is_complete(c)]


def discard_incomplete(run_dir: Path) -> list[Path]:
    """Remove the checkpoints newer than the last whole one (a save cut short); returns what was removed."""
    removed = newer_incomplete(run_dir, last_complete(run_dir))
    for checkpoint in removed:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return removed


def has_weights(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file() or (Path(path) / "config.json").is_file()
