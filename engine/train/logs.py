"""A run's log lines: train.log (and a terminal's view of the same lines) for rank 0; the warnings of the other
processes of a multi-process run, tagged with their rank, on stderr for their supervisor."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.rundir.files import open_append
from engine.rundir.layout import TRAIN_LOG
from engine.world import rank_tag

LOGGERS = {"tuner": logging.INFO, "transformers": logging.WARNING, "py.warnings": logging.WARNING}


def setup_logging(run_dir: Path, view=None) -> list[logging.Handler]:
    """``train.log`` gets tuner's, transformers' and Python's warnings as plain lines (no progress-bar carriage
    returns); a terminal ``view`` (engine.cli.train_view) shows the same lines. The previous run's handlers in this
    process are closed; the caller closes these with ``close_logging``."""
    import transformers

    plain = _formatter()
    handlers: list[logging.Handler] = [RunLogHandler(run_dir / TRAIN_LOG)]
    handlers[0].setFormatter(plain)
    if view is not None:
        handlers += view.log_handlers(plain)
    close_logging([h for name in LOGGERS for h in logging.getLogger(name).handlers])
    for name, level in LOGGERS.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = False
    transformers.logging.disable_default_handler()
    logging.captureWarnings(True)
    return handlers


def _formatter() -> logging.Formatter:
    """Plain lines; in a process of a multi-process run, tagged with its rank ("rank 1")."""
    tag = rank_tag()
    return logging.Formatter(f"%(asctime)s %(levelname)s {tag + ' ' if tag else ''}%(name)s: %(message)s",
                             "%Y-%m-%d %H:%M:%S")


def setup_rank_logging() -> list[logging.Handler]:
    """A process of a multi-process run other than rank 0: its warnings and errors, tagged with its rank, on stderr,
    which its supervisor copies into train.log."""
    import sys

    import transformers

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    transformers.logging.disable_default_handler()
    logging.captureWarnings(True)
    return [handler]


class RunLogHandler(logging.StreamHandler):
    """Appends to a run's train.log (never through a planted link) and closes it when the run is over."""

    def __init__(self, path: Path):
        super().__init__(open_append(path))

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass
        super().close()


def close_logging(handlers: list[logging.Handler]) -> None:
    """Detach a run's handlers from the loggers and close its train.log (a later run, or a prediction after
    training, in the same process logs through its own)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(handlers):
            if handler in logger.handlers:
                logger.removeHandler(handler)
    for handler in handlers:
        if isinstance(handler, RunLogHandler):
            handler.close()
    if handlers:
        logging.captureWarnings(False)
