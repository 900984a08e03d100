"""`tuner train` in the foreground of a terminal: the run's log lines on the terminal, and a progress line (step,
loss, ETA) when it is one. The run's own files are written the same either way; this is only what the terminal shows."""

from __future__ import annotations

import logging
import sys

from transformers import TrainerCallback


class TerminalView:
    """What ``engine.train.sft.run_training`` shows in a terminal: log handlers and training-loop callbacks."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)

    def log_handlers(self, formatter: logging.Formatter) -> list[logging.Handler]:
        """Plain lines on stderr when it is not a terminal; in a terminal, Rich's lines above the progress bar."""
        if not self.console.is_terminal:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(formatter)
            return [handler]
        from rich.logging import RichHandler

        return [RichHandler(console=self.console, show_path=False, markup=False, log_time_format="%H:%M:%S")]

    def download_display(self):
        """A hub model's download before training, shown as `tuner download` shows it: (show, context)."""
        from engine.cli.download import progress_display

        return progress_display()

    def callbacks(self) -> list[TrainerCallback]:
        return [ConsoleProgress(self.console)] if self.console.is_terminal else []


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
