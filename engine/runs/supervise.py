"""A run of several processes, supervised: this process starts PyTorch's launcher (torchrun) for this machine's
processes and is the run's process for everyone else (status.json names it; `tuner stop` signals it).

On node 0 the run directory was prepared and locked by ``engine.runs.launch``; rank 0 writes its events and status.
The supervisor waits for the run's GPUs, starts torchrun in a session of its own (so a terminal's Ctrl-C reaches only
the supervisor), copies torchrun's output (the other ranks' tagged warnings and errors, tracebacks) into train.log,
passes a stop on to every rank as SIGINT (they agree on the step to stop at), and when a rank dies records which one
and why: torchrun then ends the others (SIGTERM, which a rank answers by exiting at once), and the run is failed
with that rank's error. The other machines of a multi-node run run ``follow_node``: their ranks, nothing recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.errors import UserError
from engine.runs.distributed import free_port, rank_file, torchrun_argv
from engine.world import LaunchPlan, under_slurm
from engine.rundir.events import Event, EventWriter, newest_events
from engine.rundir.files import open_append, read_json
from engine.rundir.run import RunDir
from engine.rundir.status import now_iso, read_status, write_status
from engine.runs.stop import StopRequest
from engine.rundir.layout import CONFIG, TRAIN_LOG

log = logging.getLogger("tuner")

POLL_S = 0.5
STRAGGLER_GRACE_S = 60.0  # after a stop, how long the other ranks may outlive one that has ended before they are ended


def supervise(run: RunDir, plan: LaunchPlan, stop: StopRequest, force: bool = False, overwrite_cache: bool = False,
              token: str | None = None, echo=None) -> int:
    """Train ``run`` with the processes of ``plan`` on this machine (node 0); the run's exit code. ``token``: the
    hub token, for the ranks' environment only; ``echo``: a stream that shows train.log as it grows (a foreground
    run in a terminal)."""
    from engine.runs.gpu_queue import take_turn

    log_path = run.path / TRAIN_LOG
    shown_from = log_path.stat().st_size if log_path.exists() else 0
    with _logging_to(log_path):
        log.info("launching %s", plan.describe())
        take_turn(run, stop, force)  # its "queued" line goes to train.log too
    if stop.requested:
        return _record_stop(run, stop)
    run.status.state = "running"
    write_status(run.path, run.status)
    for stale in (run.path / "ranks").glob("rank*.json"):
        stale.unlink()
    port = plan.master_port or free_port()
    args = [str(run.path), "--config", str(run.path / CONFIG)] + (["--overwrite-cache"] if overwrite_cache
                                                                         else [])
    args += ["--resume-from", run.resume_from] if run.resume_from else []
    argv = torchrun_argv(plan, args, port)
    _note(log_path, "torchrun: " + " ".join(argv[1:]))
    with open_append(log_path) as out:
        launcher = _Launcher(argv, out, token)
        follower = _Echo(log_path, echo, shown_from) if echo is not None else None  # no thread before the fork
        try:
            code = launcher.wait(stop)
        except KeyboardInterrupt:  # a second stop: every rank ended at once
            code = None
        finally:
            if follower is not None:
                follower.stop()
    code = _record_stop(run, stop) if code is None else _record_outcome(run, launcher, code, stop)
    status = read_status(run.path)
    if echo is not None and status is not None and status.state == "failed":
        print(f"tuner: error: {status.error}", file=echo)  # the last line a terminal shows, after torchrun's report
    return code


def follow_node(cfg, plan: LaunchPlan, stop: StopRequest, config_text: str, resume_from: str | None = None,
                token: str | None = None, out=None) -> int:
    """One of the other machines of a multi-node run: its processes join node 0's at master_addr. Their output goes
    to this terminal (or Slurm's output file); node 0's run directory records the run."""
    import tempfile

    if plan.master_port is None:
        raise UserError("a machine other than node 0 needs node 0's master_port")
    run_dir = Path(cfg.train.output_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="tuner-node-", delete=False) as file:
        file.write(config_text)
        config_path = Path(file.name)
    try:
        resume = ["--resume-from", resume_from] if resume_from else []
        argv = torchrun_argv(plan, [str(run_dir), "--config", str(config_path), *resume], plan.master_port)
        print(f"tuner: node {plan.node_rank} of {plan.nnodes}: {plan.describe()}", file=sys.stderr, flush=True)
        launcher = _Launcher(argv, out if out is not None else sys.stderr, token)
        code = launcher.wait(stop)
    finally:
        config_path.unlink(missing_ok=True)
    if stop.requested and code == 0:
        return stop.exit_code
    if code != 0:
        culprit = launcher.culprit(run_dir)
        reason = f": {culprit.message}" if culprit else ""
        print(f"tuner: error: node {plan.node_rank}'s processes ended with exit code {code}{reason}", file=sys.stderr)
    return 0 if code == 0 else 1


class _Culprit:
    def __init__(self, rank: int | None, message: str, user_error: bool, silent: bool = False):
        self.rank, self.message, self.user_error, self.silent = rank, message, user_error, silent


class _Launcher:
    """torchrun as a child in its own session, and the ranks it starts (its own children, each in a session of its
    own), watched by pid and start time."""

    def __init__(self, argv: list[str], out, token: str | None = None):
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # each line reaches train.log when it is written
        if token:
            env["HF_TOKEN"] = token
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True, env=env, preexec_fn=_end_with_parent)
        self.ranks: dict[int, tuple[int, object]] = {}  # pid -> (global rank, psutil.Process) while it runs
        self.gone: list[tuple[float, int]] = []  # (when, rank) of ranks that ended, in the order seen
        self.seen: set[int] = set()  # every rank's pid, once seen
        self.told: set[int] = set()  # pids the stop was passed to
        self.told_at: float | None = None
        self.stragglers_ended = False

    def wait(self, stop: StopRequest) -> int:
        """torchrun's exit code, once it and every rank have ended. A stop goes to each rank as it appears (to
        torchrun itself while there is none: it ends what it has started); KeyboardInterrupt (a second stop) ends
        them all at once."""
        try:
            while self.process.poll() is None:
                self._watch_ranks()
                if stop.requested:
                    self._pass_stop_on()
                    time.sleep(POLL_S)
                else:
                    stop.wait(POLL_S)
        except KeyboardInterrupt:
            self._end_all()
            raise
        finally:
            self._watch_ranks()  # the ranks that ended since the last look count as gone, in order
            self._end_ranks()  # torchrun gone (killed from outside too): no rank trains on unrecorded
        return self.process.returncode

    def _pass_stop_on(self) -> None:
        if not self.ranks and not self.gone:
            if not self.told:
                self.process.terminate()
                self.told.add(self.process.pid)
            return
        for pid, (_, process) in self.ranks.items():
            if pid not in self.told:
                _signal(process, signal.SIGINT)
                self.told.add(pid)
                self.told_at = self.told_at or time.monotonic()
        if self.gone and not self.stragglers_ended and self.told_at is not None and \
                time.monotonic() - max(self.gone[0][0], self.told_at) > STRAGGLER_GRACE_S:
            # they stopped at another moment, or wait in a collective; under Slurm a rank ignores SIGTERM
            for _, process in self.ranks.values():
                _signal(process, signal.SIGKILL if under_slurm() else signal.SIGTERM)
            self.stragglers_ended = True

    def _watch_ranks(self) -> None:
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=False)
        except psutil.Error:
            children = []
        for child in children:
            if child.pid in self.seen:
                continue
            try:
                rank = child.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None and rank.isdigit():
                self.ranks[child.pid] = (int(rank), child)
                self.seen.add(child.pid)
        now = time.monotonic()
        for pid, (rank, process) in list(self.ranks.items()):
            if not _running(process):
                self.gone.append((now, rank))
                del self.ranks[pid]

    def _end_ranks(self) -> None:
        for _, process in self.ranks.values():
            _signal(process, signal.SIGKILL)
        self.ranks.clear()

    def _end_all(self) -> None:
        self._end_ranks()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()

    def culprit(self, run_dir: Path) -> _Culprit | None:
        """The rank whose end ended the run. Each rank leaves its last word (engine.runs.rank): ended well, ended by
        torchrun's teardown, or its error; none at all is a kill. The first ranks to go that did not end well or by
        the teardown are the suspects: one killed before one whose error followed (a peer's lost connection), else
        the earliest error; then any error a rank wrote."""
        words = {}
        for path in (Path(run_dir) / "ranks").glob("rank*.json"):
            try:
                data = read_json(path)
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("rank"), int):
                words[data["rank"]] = data
        suspects = [(when, rank) for when, rank in self.gone
                    if words.get(rank, {}).get("outcome") not in ("ok", "torn_down")]
        if suspects:
            first = [rank for when, rank in suspects if when == suspects[0][0]]
            silent = [rank for rank in first if rank not in words]
            if silent:
                return _Culprit(silent[0], "its process ended without a word (killed: by a signal, or out of memory)",
                                False, silent=True)
            rank = min(first, key=lambda r: words[r].get("time", 0))
            return _Culprit(rank, str(words[rank].get("message")), bool(words[rank].get("user_error")))
        errors = [w for w in words.values() if w.get("outcome") == "error"]
        if errors:
            data = min(errors, key=lambda w: w.get("time", 0))
            return _Culprit(data["rank"], str(data.get("message")), bool(data.get("user_error")))
        return None


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(process, sig: int) -> None:
    """``sig`` to a rank known by pid and start time (psutil checks both), never to a pid reused since."""
    import psutil

    try:
        process.send_signal(sig)
    except psutil.Error:
        pass


def _end_with_parent() -> None:
    """In torchrun's process before it starts: a supervisor killed outright (kill -9) takes torchrun, and so the
    ranks, with it, rather than leaving a training nobody records (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _record_outcome(run: RunDir, launcher: _Launcher, code: int, stop: StopRequest) -> int:
    """What status.json says after torchrun ended: rank 0's own record when the run ended as it should, else a
    failure naming the rank that ended it."""
    status = read_status(run.path) or run.status
    if status.state == "stopped" and code == 0 and stop.requested and status.exit_code != stop.exit_code:
        # rank 0 recorded the SIGINT this process passed on to every rank; the run itself got stop.requested
        status.exit_code = stop.exit_code
        write_status(run.path, status)
    if status.state in ("completed", "stopped") and code == 0:
        return status.exit_code or 0
    if status.state == "completed":
        _note(run.path / TRAIN_LOG, f"torchrun ended with exit code {code} after the run completed; its results "
                                      "are whole")
        return 0
    culprit = launcher.culprit(run.path)
    if stop.requested and (culprit is None or culprit.silent):
        # ranks that stopped at other moments were ended, or one had no handler yet: the run is stopped
        return _record_stop(run, stop)
    if culprit is None:
        message = f"torchrun ended with exit code {code} before the run recorded an end"
    else:
        message = f"rank {culprit.rank} failed: {culprit.message}"
    status.state, status.error, status.ended_at = "failed", message, now_iso()
    status.exit_code = 2 if culprit is not None and culprit.user_error else 1
    write_status(run.path, status)
    events = EventWriter(run.path)
    try:
        events.emit(Event.ERROR, message=message, rank=culprit.rank if culprit else None)
        if not _ended(run.path):
            events.emit(Event.END, state="failed", step=status.step)
    finally:
        events.close()
    _note(run.path / TRAIN_LOG, f"training ended: {message}")
    return status.exit_code


def _record_stop(run: RunDir, stop: StopRequest) -> int:
    """Record a stop that rank 0 did not record itself (it came before the ranks started, or one was ended)."""
    status = read_status(run.path) or run.status
    if status.state in ("completed", "stopped", "failed"):
        return status.exit_code or 0
    events = EventWriter(run.path)
    try:
        events.emit(Event.END, state="stopped", signal=stop.requested, step=status.step)
    finally:
        events.close()
    status.state, status.ended_at, status.exit_code = "stopped", now_iso(), stop.exit_code
    write_status(run.path, status)
    return stop.exit_code


def _ended(run_dir: Path) -> bool:
    """Whether the last start of the run has its end event."""
    for event in newest_events(run_dir, types=(Event.START, Event.END), max_bytes=None):
        return event["type"] == Event.END
    return False


@contextlib.contextmanager
def _logging_to(log_path: Path):
    """tuner's log lines of this process (the queue's) into train.log while it prepares the launch."""
    handler = logging.StreamHandler(open_append(log_path))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.stream.close()


def _note(log_path: Path, line: str) -> None:
    with open_append(log_path) as out:
        out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} INFO tuner: {line}\n")


class _Echo:
    """train.log shown on a terminal as it grows from ``offset`` (`tuner logs -f`, in a thread)."""

    def __init__(self, path: Path, stream, offset: int, poll_s: float = 0.2):
        self.path, self.stream, self.offset, self.poll_s = path, stream, offset, poll_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from engine.rundir.files import open_regular, printable

        while True:
            last = self._done.is_set()
            with open_regular(self.path) as file:
                file.seek(self.offset)
                chunk = file.read()
            if chunk:
                self.offset += len(chunk)
                self.stream.write(printable(chunk.decode("utf-8", errors="replace")))
                self.stream.flush()
            if last:
                return
            self._done.wait(self.poll_s)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def write_last_word(run_dir: Path, rank: int, outcome: str, message: str = "", user_error: bool = False) -> None:
    """A rank's last word for its supervisor (``_Launcher.culprit``): outcome ok, torn_down or error."""
    from engine.rundir.files import write_json_atomic

    path = rank_file(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"rank": rank, "outcome": outcome, "message": message, "user_error": user_error,
                                 "time": time.time(), "pid": os.getpid()})
    except OSError:
        pass
