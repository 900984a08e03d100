"""`tuner train` in the foreground of a terminal: the run's log lines on the terminal, and a progress line (step,
loss, ETA) when it is one. The run's own files are written the same either way; this is only what the terminal shows."""

from __future__ import annotations

import logging
import sys

from engine.rundir.files import printable


class TerminalView:
    """What ``engine.train.runner.run_training`` shows in a terminal: log handlers and training-loop callbacks."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)

    def log_handlers(self, formatter: logging.Formatter) -> list[logging.Handler]:
        """Plain lines on stderr when it is not a terminal; in a terminal, Rich's lines above the progress bar."""
        if not self.console.is_terminal:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_Shown(formatter))
            return [handler]
        from rich.logging import RichHandler

        class ShownRichHandler(RichHandler):
            def render_message(self, record, message):
                return super().render_message(record, printable(message))

        return [ShownRichHandler(console=self.console, show_path=False, markup=False, log_time_format="%H:%M:%S")]

    def download_display(self):
        """A hub model's download before training, shown as `tuner download` shows it: (show, context)."""
        from engine.cli.download import progress_display

        return progress_display()

    def callbacks(self) -> list:
        """Asked for by the process that trains; a launcher that only supervises ranks never imports transformers."""
        if not self.console.is_terminal:
            return []
        from engine.cli.train_progress import ConsoleProgress

        return [ConsoleProgress(self.console)]


class _Shown(logging.Formatter):
    """The run's log lines as a terminal shows them: what they quote from a dataset, a config or a path (a role
    with an escape sequence, an output_dir with a bidi override) is shown, never obeyed. train.log keeps them as
    written; `tuner logs` and the dashboard clean them the same way."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return printable(self.inner.format(record))
