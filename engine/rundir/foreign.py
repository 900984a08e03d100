"""Runs this tool did not start, read-only: a Hugging Face Trainer output directory (trainer_state.json) or a
LLaMA-Factory one (trainer_log.jsonl), turned into the same events and status our own runs write."""

from __future__ import annotations

import json
from pathlib import Path

from engine.rundir.checkpoints import checkpoints, step_of
from engine.rundir.events import MAX_LINE_BYTES, Event
from engine.rundir.files import lines_of, open_regular, read_json
from engine.rundir.status import RunStatus, finite
from engine.rundir.layout import TRAINER_LOG


def _latest_trainer_state(run_dir: Path) -> Path | None:
    """The run's own trainer_state.json, else the one in its newest checkpoint."""
    if (run_dir / "trainer_state.json").is_file():
        return run_dir / "trainer_state.json"
    for checkpoint in reversed(checkpoints(run_dir)):
        if (checkpoint / "trainer_state.json").is_file():
            return checkpoint / "trainer_state.json"
    return None


def hf_trainer_events(run_dir: Path) -> list[dict] | None:
    """log / eval events from a Trainer's log_history; None when the directory has no trainer_state.json."""
    path = _latest_trainer_state(run_dir)
    if path is None:
        return None
    try:
        state = read_json(path, max_bytes=64 << 20, nan=True)  # an fp16 overflow's grad_norm is NaN there
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("log_history", []), list):
        return None
    total = state.get("max_steps")
    events = []
    for entry in state.get("log_history", []):
        if not isinstance(entry, dict):
            continue
        if "loss" in entry:
            events.append(finite({"type": Event.LOG.value, "step": entry.get("step"), "total_steps": total,
                                  "epoch": entry.get("epoch"), "loss": entry["loss"],
                                  "learning_rate": entry.get("learning_rate"), "grad_norm": entry.get("grad_norm")}))
        elif "eval_loss" in entry:
            events.append(finite({"type": Event.EVAL.value, "step": entry.get("step"), "epoch": entry.get("epoch"),
                                  "eval_loss": entry["eval_loss"]}))
    for checkpoint in checkpoints(run_dir):
        events.append({"type": Event.CHECKPOINT.value, "step": step_of(checkpoint), "path": str(checkpoint)})
    return events


def llamafactory_events(run_dir: Path) -> list[dict] | None:
    """log / eval events from LLaMA-Factory's trainer_log.jsonl (a torn last line is skipped)."""
    path = run_dir / TRAINER_LOG
    if not path.is_file():
        return None
    events = []
    try:
        with open_regular(path) as file:
            lines = list(lines_of(file, MAX_LINE_BYTES))
    except OSError:
        return None
    for line in lines:
        try:
            entry = json.loads(line.decode("utf-8", errors="replace"))
        except (ValueError, RecursionError):
            continue
        if not isinstance(entry, dict):
            continue
        step, total = entry.get("current_steps"), entry.get("total_steps")
        if entry.get("loss") is not None:
            events.append({"type": Event.LOG.value, "step": step, "total_steps": total, "epoch": entry.get("epoch"),
                           "loss": entry["loss"], "learning_rate": entry.get("lr"),
                           "tokens_per_s": entry.get("throughput")})
        if entry.get("eval_loss") is not None:
            events.append({"type": Event.EVAL.value, "step": step, "epoch": entry.get("epoch"),
                           "eval_loss": entry["eval_loss"]})
    return events


def foreign_run(run_dir: Path) -> tuple[RunStatus, list[dict]] | None:
    """A status and events for a directory another tool wrote; None when it is neither kind."""
    run_dir = Path(run_dir)
    for kind, reader in (("llama-factory", llamafactory_events), ("hf-trainer", hf_trainer_events)):
        events = reader(run_dir)
        if events is not None:
            logs = [e for e in events if e["type"] == Event.LOG]
            last = logs[-1] if logs else {}
            total = last.get("total_steps")
            finished = bool(total) and last.get("step") == total
            status = RunStatus(id=f"{kind}:{run_dir.name}", name=run_dir.name, state="completed" if finished else
                               "external", pid=None, output_dir=str(run_dir.resolve()), method=kind,
                               step=last.get("step") or 0, total_steps=total, loss=last.get("loss"))
            return status, events
    return None
