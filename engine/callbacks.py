"""Trainer callbacks that turn the training loop into the run's files: events, status, LLaMA-Factory's trainer_log.

They also carry a graceful stop: a signal sets a flag, the current step ends, a checkpoint is saved.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from datetime import timedelta
from pathlib import Path

from transformers import TrainerCallback

from engine.runs import EventWriter, RunStatus, write_status

log = logging.getLogger("tuner")


def gpu_memory_gib() -> dict[str, float] | None:
    """Peak memory since the start on this process's GPU: torch's allocated and reserved, and NVML's used, in GiB."""
    import torch

    if not torch.cuda.is_available():
        return None
    gib = 1024**3
    memory = {
        "max_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3),
        "max_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        memory["nvml_used_gib"] = round(pynvml.nvmlDeviceGetMemoryInfo(handle).used / gib, 3)
    except Exception:  # NVML missing or the field unsupported: torch's figures still stand
        pass
    return memory


class RunEvents(TrainerCallback):
    """Writes a ``log`` event per logging step (step, loss, lr, grad norm, tokens/s, elapsed, remaining), ``eval``,
    ``checkpoint`` events, ``status.json`` progress and ``trainer_log.jsonl`` in LLaMA-Factory's line format."""

    def __init__(self, run_dir: Path, events: EventWriter, status: RunStatus):
        self.run_dir = Path(run_dir)
        self.events = events
        self.status = status
        self.trainer_log = open(self.run_dir / "trainer_log.jsonl", "a", encoding="utf-8")
        self.start_time = time.time()
        self.start_step = 0
        self.last_time = self.start_time
        self.last_tokens = 0
        self.peak_memory: dict[str, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = self.last_time = time.time()
        self.start_step = state.global_step
        self.last_tokens = state.num_input_tokens_seen
        self.status.total_steps = state.max_steps
        write_status(self.run_dir, self.status)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs:
            self._log_event(state, logs)
        elif "eval_loss" in logs:
            self.events.emit("eval", **{**logs, "step": state.global_step, "epoch": state.epoch})
            self._trainer_log(state, {"eval_loss": logs["eval_loss"]})

    def _log_event(self, state, logs: dict) -> None:
        now = time.time()
        tokens = state.num_input_tokens_seen
        tokens_per_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        elapsed = now - self.start_time
        done = state.global_step - self.start_step
        remaining = elapsed / done * (state.max_steps - state.global_step) if done > 0 else None
        memory = gpu_memory_gib()
        if memory:
            self.peak_memory = memory
        event = self.events.emit(
            "log", step=state.global_step, total_steps=state.max_steps, epoch=state.epoch, loss=logs.get("loss"),
            learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_per_s=round(tokens_per_s, 1), tokens_seen=tokens, elapsed_s=round(elapsed, 2),
            remaining_s=None if remaining is None else round(remaining, 1), memory=memory,
        )
        log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.0f tokens/s  %s left", state.global_step,
                 state.max_steps, state.epoch or 0.0, event["loss"], event["learning_rate"] or 0.0, tokens_per_s,
                 "?" if remaining is None else timedelta(seconds=int(remaining)))
        self.status.step, self.status.loss = state.global_step, event["loss"]
        write_status(self.run_dir, self.status)
        self._trainer_log(state, {"loss": event["loss"], "lr": event["learning_rate"],
                                  "throughput": event["tokens_per_s"], "total_tokens": tokens},
                          elapsed=elapsed, remaining=remaining)

    def _trainer_log(self, state, values: dict, elapsed: float | None = None, remaining: float | None = None):
        elapsed = time.time() - self.start_time if elapsed is None else elapsed
        line = {
            "current_steps": state.global_step, "total_steps": state.max_steps, **values,
            "epoch": round(state.epoch or 0.0, 2),
            "percentage": round(100 * state.global_step / state.max_steps, 2) if state.max_steps else 0.0,
            "elapsed_time": str(timedelta(seconds=int(elapsed))),
            "remaining_time": str(timedelta(seconds=int(remaining or 0))),
        }
        self.trainer_log.write(json.dumps(line) + "\n")
        self.trainer_log.flush()

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir).resolve() / f"checkpoint-{state.global_step}"
        self.events.emit("checkpoint", step=state.global_step, path=str(path))

    def close(self) -> None:
        self.trainer_log.close()


class GracefulStop(TrainerCallback):
    """SIGINT / SIGTERM: finish the step, save a checkpoint, stop. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: finishing this step and saving a checkpoint (again to stop at once)",
                    self.requested)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


class ConsoleProgress(TrainerCallback):
    """A Rich progress line (step, loss, ETA) for a run in the foreground of a terminal."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), console=console,
        )
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress.update(self.task, info=f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}")

    def on_train_end(self, args, state, control, **kwargs):
        self.progress.stop()
