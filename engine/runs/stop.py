"""Stopping a run gracefully: SIGINT, SIGTERM and SIGHUP (the terminal closed) ask the run to finish its step, save
a checkpoint and end "stopped"; a second signal stops at once. Handlers go in before anything slow, and a launcher
starts a run with these signals blocked, so a stop in its first moments waits for them instead of killing it."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("tuner")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    def __init__(self):
        self.requested: str | None = None
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._terminals: list[int] = []
        self._asked = threading.Event()

    def install(self) -> StopRequest:
        """Handle the stop signals; a hangup that was ignored (``nohup``) stays ignored."""
        self._terminals = [fd for fd in (1, 2) if os.isatty(fd)]  # asked now: a hung-up terminal may not say
        for sig in STOP_SIGNALS:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking as soon as a stop is asked for; whether one was."""
        return self._asked.wait(seconds)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended (Ctrl-C: 130)."""
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum, frame):
        if signum == signal.SIGHUP:
            _drop_terminal(self._terminals)
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = signal.Signals(signum).name, signum
        self._asked.set()
        log.warning("%s received: finishing this step and saving a checkpoint (again to stop at once)",
                    self.requested)


def _drop_terminal(terminals: list[int]) -> None:
    """The terminal is gone: what would have gone to it goes nowhere, so no write to it fails; train.log (and a
    detached run's output, which is no terminal) goes on."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in terminals:
        os.dup2(devnull, fd)
    os.close(devnull)


def blocked_stop_signals():
    """A context in which this thread (and any process it starts) holds the stop signals back."""
    from contextlib import contextmanager

    @contextmanager
    def block():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    return block()
