"""The checkpoints of a run directory, and which of them are whole.

The Trainer writes a checkpoint's weights first and ``trainer_state.json`` last, so a save cut short (kill -9, a
full disk) leaves a ``checkpoint-N`` without a readable state: such a one is never resumed from. Nor is one whose
files were damaged later (a copy cut short, a disk error, a hand edit): safetensors weights shorter than their
header says, an optimizer or scheduler state that is not a whole zip archive, a state whose log is not a list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from engine.rundir.files import open_regular, read_json

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                "adapter_model.bin", "pytorch_model.bin")
TORCH_STATES = ("optimizer.pt", "scheduler.pt", "rng_state.pth")  # torch.save's zip archives, when present
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


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
    """Weights present and whole, the optimizer's and scheduler's states whole when present, and
    ``trainer_state.json`` readable with the checkpoint's own step and a list for its log."""
    checkpoint = Path(checkpoint)
    if not any((checkpoint / name).is_file() for name in WEIGHT_FILES):
        return False
    try:
        state = read_json(checkpoint / "trainer_state.json", max_bytes=1 << 30, nan=True)
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != step_of(checkpoint):
        return False
    history = state.get("log_history", [])
    if not isinstance(history, list) or not all(isinstance(entry, dict) for entry in history):
        return False
    return _weights_whole(checkpoint) and all(zipfile.is_zipfile(checkpoint / name) for name in TORCH_STATES
                                              if (checkpoint / name).is_file())


def _weights_whole(checkpoint: Path) -> bool:
    """Every safetensors file of the checkpoint (the shards its index names included) as long as its header says."""
    files = [checkpoint / name for name in ("adapter_model.safetensors", "model.safetensors")
             if (checkpoint / name).exists()]
    index = checkpoint / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = read_json(index, max_bytes=64 << 20)["weight_map"].values()
            files += [checkpoint / Path(str(shard)).name for shard in set(shards)]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
    return all(safetensors_whole(file) for file in files)


def safetensors_whole(path: Path) -> bool:
    """Whether ``path`` is a safetensors file as long as its header says: an 8-byte header length, the JSON header,
    then exactly the bytes its tensors' offsets reach (what safetensors checks before it loads anything)."""
    try:
        with open_regular(path) as file:
            size = os.fstat(file.fileno()).st_size
            length = int.from_bytes(file.read(8), "little")
            if size < 8 or not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                return False
            header = json.loads(file.read(length).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(header, dict):
        return False
    try:
        end = max((int(t["data_offsets"][1]) for name, t in header.items() if name != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return False
    return size == 8 + length + end


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
