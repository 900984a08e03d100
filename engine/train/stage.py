"""What the runner (engine.train.runner) and a training stage (engine.train.sft, ...) share.

A stage is two functions: its data (tokenized the way its trainer reads it) and its trainer (TRL's, with its own
config class). Everything else a run has, the runner does once for every stage: logging, the download, precision,
the speed plan and strategy, loading the model and the method, the callbacks that write the run directory, the
back-off after an out-of-memory first step, resume, saving, results files, and how a failure is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class StopAsked(Protocol):
    """A graceful stop as training sees it, handed to it by whoever started the run (engine.runs.stop's StopRequest):
    what asked for it (None until something did), the exit code a stopped run ends with, and a sleep a stop cuts
    short."""

    requested: str | None

    @property
    def exit_code(self) -> int: ...

    def wait(self, seconds: float) -> bool: ...


@dataclass
class TrainerParts:
    """What the runner has ready when a stage builds its trainer (again, with a smaller layout, after a back-off)."""

    cfg: Any  # engine.config.schema.TunerConfig
    model: Any
    tokenizer: Any
    datasets: Any  # what the stage's ``datasets`` returned
    precision: Any  # engine.models.loading.Precision
    hardware: Any  # engine.models.loading.Hardware
    run: Any  # engine.rundir.run.RunDir
    callbacks: list
    divergence: Any  # engine.train.callbacks.Divergence: the trainer class is wrapped to watch each step's loss
    strategy: Any  # engine.train.strategy's prepared strategy
    model_path: str = ""  # where the model was loaded from (a stage loading a reference loads it from there too)
    reference: Any = None  # a stage's reference model, once loaded: kept for a rebuild after a back-off


@dataclass(frozen=True)
class Stage:
    """One training stage. ``datasets(cfg, tokenizer, catalog_template, stop_wait)`` returns the tokenized data with
    ``train``, ``eval``, ``lengths``, ``template``, ``report`` and ``saved_to`` (engine.data.tokenize.TrainingData's
    fields); ``trainer(parts, plan)`` returns the Trainer for them under the speed plan ``plan``."""

    name: str
    datasets: Callable[..., Any]
    trainer: Callable[[TrainerParts, Any], Any]
    pairs: bool = False  # its samples are preference pairs: padded batches, no packing, no Liger, the batch as given
    perplexity: bool = True  # its eval loss is a language model's, so eval_results.json gets exp(eval_loss)
    plots: tuple[str, ...] = ("loss", "eval_loss")  # what plot_loss draws, as LLaMA-Factory's workflow for it
    reward: bool = False  # it trains a reward model: the decoder under a score head, not a language model
