"""Trainer callbacks that turn the training loop into the run's files: events, status, LLaMA-Factory's trainer_log.

They also carry a graceful stop: a signal sets a flag, the current step ends, a checkpoint is saved.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from datetime import timedelta
from pathlib import Path

from transformers import TrainerCallback

from engine.rundir.events import Event, EventWriter
from engine.rundir.files import open_append
from engine.rundir.series import PACE_LOGS, remaining_s
from engine.rundir.status import RunStatus, finite, write_status
from engine.train.stage import StopAsked
from engine.rundir.layout import TRAINER_LOG

log = logging.getLogger("tuner")


def gpu_memory_gib() -> dict[str, float] | None:
    """Peak memory since the start on this process's GPU: torch's allocated and reserved, and NVML's used, in GiB."""
    import torch

    if not _on_cuda():
        return None
    gib = 1024**3
    memory = {
        "max_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3),
        "max_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3),
    }
    try:
        from engine.hardware import cuda_device_uuid, nvml_memory_used

        index = torch.cuda.current_device()  # CUDA's number, not NVML's: the GPU is found by its UUID
        used = nvml_memory_used(index, cuda_device_uuid(index))
    except Exception:  # NVML missing: torch's figures still stand
        used = None
    if used is not None:
        memory["nvml_used_gib"] = round(used / gib, 3)
    return memory


def reset_peak_memory() -> None:
    """Start the peak statistics afresh: after an out-of-memory back-off the failed attempt's peak is not the run's."""
    import torch

    if _on_cuda():
        torch.cuda.reset_peak_memory_stats()


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class TrainerLog:
    """LLaMA-Factory's ``trainer_log.jsonl``, as its LogCallback writes it (keys, their order, rounding, times),
    for LlamaBoard and users' scripts: a line per Trainer log in training (each logging step, each evaluation, the
    closing summary) and, in predict, one every ``PREDICT_EVERY`` batches. Speed and remaining time count from
    ``start`` (on resume: this session's steps and tokens, as transformers' own train_tokens_per_second does)."""

    PREDICT_EVERY = 5

    def __init__(self, path: Path):
        self.file = open_append(path)
        self.start(total_steps=0)

    def start(self, total_steps: int, step: int = 0, tokens_seen: int = 0) -> None:
        self.start_time = time.time()
        self.total_steps, self.start_step, self.start_tokens = total_steps, step, tokens_seen

    def training(self, step: int, logs: dict, tokens_seen: int) -> None:
        """The line for one of the Trainer's logs (``logs`` as on_log gets them)."""
        elapsed = time.time() - self.start_time
        line = {
            "current_steps": step, "total_steps": self.total_steps, "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"), "predict_loss": logs.get("predict_loss"), "reward": logs.get("reward"),
            "accuracy": logs.get("rewards/accuracies"), "lr": logs.get("learning_rate"), "epoch": logs.get("epoch"),
            **self._progress(step, elapsed),
        }
        if tokens_seen:
            line["throughput"] = round((tokens_seen - self.start_tokens) / max(elapsed, 1e-9), 2)
            line["total_tokens"] = tokens_seen
        self._write({key: value for key, value in line.items() if value is not None})

    def prediction_step(self, step: int) -> None:
        """After predict's ``step``-th batch of ``total_steps``."""
        if step % self.PREDICT_EVERY == 0:
            self._write({"current_steps": step, "total_steps": self.total_steps,
                         **self._progress(step, time.time() - self.start_time)})

    def _progress(self, step: int, elapsed: float) -> dict:
        done = step - self.start_step
        remaining = (self.total_steps - step) * elapsed / done if done > 0 else 0
        return {"percentage": round(step / self.total_steps * 100, 2) if self.total_steps else 100,
                "elapsed_time": str(timedelta(seconds=int(elapsed))),
                "remaining_time": str(timedelta(seconds=int(remaining)))}

    def _write(self, line: dict) -> None:
        self.file.write(json.dumps(finite(line), allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class RunEvents(TrainerCallback):
    """Writes a ``log`` event per logging step (step, loss, lr, grad norm, tokens/s, elapsed, remaining), ``eval``,
    ``checkpoint`` events, ``status.json`` progress and ``trainer_log.jsonl`` (TrainerLog)."""

    def __init__(self, run_dir: Path, events: EventWriter, status: RunStatus):
        self.run_dir = Path(run_dir)
        self.events = events
        self.status = status
        self.trainer_log = TrainerLog(self.run_dir / TRAINER_LOG)
        self.start_time = time.time()
        self.last_time = self.start_time
        self.last_tokens = 0
        self.logged: deque[tuple[int, float]] = deque(maxlen=PACE_LOGS + 1)  # (step, time): the ETA's pace
        self.peak_memory: dict[str, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = self.last_time = time.time()
        self.logged.clear()
        self.last_tokens = state.num_input_tokens_seen
        self.trainer_log.start(state.max_steps, state.global_step, state.num_input_tokens_seen)
        self.status.total_steps = state.max_steps
        write_status(self.run_dir, self.status)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "loss" in logs:
            self._log_event(state, logs)
        elif "eval_loss" in logs:
            self.events.emit(Event.EVAL, **{**logs, "step": state.global_step, "epoch": state.epoch})
        self.trainer_log.training(state.global_step, logs, state.num_input_tokens_seen)

    def _log_event(self, state, logs: dict) -> None:
        now = time.time()
        tokens = state.num_input_tokens_seen or int(logs.get("num_tokens") or 0)  # a preference stage counts its own
        tokens_per_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        elapsed = now - self.start_time
        self.logged.append((state.global_step, now))
        remaining = remaining_s(tuple(self.logged), state.max_steps)
        memory = gpu_memory_gib()
        if memory:
            self.peak_memory = memory
        event = self.events.emit(
            Event.LOG, step=state.global_step, total_steps=state.max_steps, epoch=state.epoch, loss=logs.get("loss"),
            learning_rate=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"),
            tokens_per_s=round(tokens_per_s, 1), tokens_seen=tokens, elapsed_s=round(elapsed, 2),
            remaining_s=None if remaining is None else round(remaining, 1), memory=memory,
            **({"metrics": metrics} if (metrics := stage_metrics(logs)) else {}),
        )
        log.info("step %d/%d  epoch %.2f  loss %.4f  lr %.3g  %.0f tokens/s  %s left", state.global_step,
                 state.max_steps, state.epoch or 0.0, logs.get("loss"), logs.get("learning_rate") or 0.0, tokens_per_s,
                 "?" if remaining is None else timedelta(seconds=int(remaining)))
        self.status.step, self.status.loss = state.global_step, event["loss"]
        write_status(self.run_dir, self.status)

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir).resolve() / f"checkpoint-{state.global_step}"
        self.events.emit(Event.CHECKPOINT, step=state.global_step, path=str(path))

    def close(self) -> None:
        self.trainer_log.close()


def any_process(flag: bool) -> bool:
    """``flag`` of any process of a multi-process run (a collective: every rank calls it at the same point);
    ``flag`` itself in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# TRL's stage metrics without a "/": ORPO's, KTO's, and the RewardTrainer's
STAGE_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen", "kl", "accuracy", "margin", "mean_reward",
                 "min_reward", "max_reward")


def stage_metrics(logs: dict) -> dict:
    """What a stage's trainer logs beyond the loss, by TRL's names ("rewards/chosen", "rewards/margins",
    "rewards/accuracies", "logps/rejected", ORPO's "nll_loss" and "log_odds_ratio", a reward model's "accuracy"
    and "margin", ...): the log event's
    ``metrics``, which the dashboard can draw."""
    return {key: value for key, value in logs.items() if ("/" in key or key in STAGE_METRICS)
            and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class GracefulStop(TrainerCallback):
    """A stop asked for (handed in: engine.runs.stop's StopRequest): finish the step, save a checkpoint, stop. Under
    several processes a stop any of them got is every one's, from the same step on, so all take the same path after
    training."""

    def __init__(self, stop: StopAsked):
        self.stop = stop

    def on_step_end(self, args, state, control, **kwargs):
        if any_process(bool(self.stop.requested)):  # every rank stops after the same step, or they would hang
            self.stop.requested = self.stop.requested or "a stop asked of another process"  # and ends "stopped"
            control.should_save = True
            control.should_training_stop = True


COLLAPSE_LOGS = 3  # logged steps in a row with a zero gradient and an unchanged loss: a collapsed run
COLLAPSED = "collapse"


class Divergence(TrainerCallback):
    """A non-finite loss (any step) or gradient norm (a logged step) ends training without saving what diverged,
    so the last checkpoint stays the last good one. Under fp16 an infinite gradient norm is the loss scaler's
    business (it skips that step), not divergence. So does a collapse: COLLAPSE_LOGS logged steps in a row with a
    gradient norm of exactly 0 and the same loss (weights a far too high learning rate wrecked, which learn nothing
    more however long the run goes on)."""

    def __init__(self, grad_norm_may_overflow: bool = False):
        self.grad_norm_may_overflow = grad_norm_may_overflow
        self.found: tuple[int, str, float] | None = None  # step, what, value
        self.recent: deque[tuple[float, float]] = deque(maxlen=COLLAPSE_LOGS)  # (grad norm, loss) of the last logs

    def watching(self, trainer_class):
        """``trainer_class`` with each training step's loss checked (the Trainer syncs on it anyway)."""
        import torch

        divergence = self

        class Watched(trainer_class):
            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                if divergence.found is None and not bool(torch.isfinite(loss).all()):
                    divergence.found = (self.state.global_step + 1, "loss", float(loss.detach().float().mean()))
                return loss

        Watched.__name__ = Watched.__qualname__ = trainer_class.__name__
        return Watched

    def on_step_end(self, args, state, control, **kwargs):
        self._agree_across_processes(state)
        self._halt(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._halt(control)  # the Trainer's own flow would save at the end of the epoch otherwise

    def _agree_across_processes(self, state) -> None:
        """Under several processes one rank's divergence stops them all at the same step (else the others wait in
        a collective until ddp_timeout)."""
        if any_process(self.found is not None) and self.found is None:
            self.found = (state.global_step, "loss on another process", math.nan)

    def on_log(self, args, state, control, logs=None, **kwargs):
        grad_norm, loss = (logs or {}).get("grad_norm"), (logs or {}).get("loss")
        if self.found is None and isinstance(grad_norm, float) and not math.isfinite(grad_norm) \
                and not self.grad_norm_may_overflow:
            self.found = (state.global_step, "gradient norm", grad_norm)
        if isinstance(grad_norm, (int, float)) and isinstance(loss, (int, float)):
            self.recent.append((float(grad_norm), float(loss)))
            if self.found is None and self._collapsed():
                self.found = (state.global_step, COLLAPSED, float(loss))
        self._halt(control)

    def _collapsed(self) -> bool:
        """The last COLLAPSE_LOGS logged steps had no gradient at all and the very same loss: nothing is learned."""
        if len(self.recent) < COLLAPSE_LOGS:
            return False
        losses = [loss for _, loss in self.recent]
        return all(norm == 0.0 for norm, _ in self.recent) and losses[-1] > 1e-6 and \
            max(losses) - min(losses) <= 1e-6 * max(1.0, abs(losses[-1]))  # a loss of 0: learnt by heart, not lost

    def _halt(self, control) -> None:
        if self.found is not None:
            control.should_save = False
            control.should_training_stop = True

    def message(self, cfg, last_good: Path | None) -> str:
        step, what, value = self.found
        kept = f"; {last_good} is the last good checkpoint" if last_good else "; no checkpoint was saved before it"
        if what == COLLAPSED:
            return (f"training collapsed at step {step}: the gradient norm has been exactly 0 and the loss stuck at "
                    f"{value:.4f} for the last {COLLAPSE_LOGS} logged steps, so the model learns nothing more (a "
                    f"learning rate far too high wrecks the weights in the first steps: {cfg.train.learning_rate:g} "
                    f"here){kept}. Lower learning_rate (LoRA usually 1e-5 to 1e-3, full 1e-6 to 1e-4) and start "
                    "again with overwrite_output_dir true")
        return (f"training diverged at step {step}: the {what} is {value}{kept}. Lower learning_rate "
                f"({cfg.train.learning_rate:g}), add warmup (warmup_ratio 0.03), keep max_grad_norm at 1.0, or "
                "prefer bf16 to fp16, then start again with overwrite_output_dir true")
