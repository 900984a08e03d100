"""What the tests of runs as jobs share: a state home of their own, `tuner` as a subprocess, waiting on a condition."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUN = ["--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--per_device_train_batch_size", "8",
       "--logging_steps", "5", "--learning_rate", "1e-3"]


def tuner(*args: str, cwd: Path, input: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tuner ARGS` typed in the folder ``cwd``, with ``env`` added to the environment: the same code the shell's
    `tuner` runs (engine.cli.main), in this process, so it costs no new interpreter and its ten seconds of imports.
    What it starts (a detached run, a resumed one) is a real process of its own. A test about the process that types
    the command (its session, its signals) starts `python -m engine.cli` itself."""
    from engine.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with _environment(env or {}), _folder(cwd), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr), _stdin(io.StringIO(input)), _as_a_new_process_shows_them():
        code = main(list(args))
    return subprocess.CompletedProcess(["tuner", *args], code, stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def _as_a_new_process_shows_them():
    """Warnings and log records reach stderr as they would in a process of its own, not pytest's captures: Python's
    default warning filters, and logging's last resort (warnings and worse, to stderr) where no handler of the run
    takes a record."""
    import logging
    import warnings

    root = logging.getLogger()
    pytest_handlers, root.handlers = root.handlers, []
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _show_warning
            yield
    finally:
        root.handlers = pytest_handlers


def _show_warning(message, category, filename, lineno, file=None, line=None):
    import warnings

    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _environment(added: dict[str, str]):
    before = {name: os.environ.get(name) for name in added}
    os.environ.update(added)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _folder(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _stdin(stream):
    saved, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = saved


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def logged(run_dir: Path, at_least: int = 1) -> bool:
    """Whether the run has logged a step of at least ``at_least``."""
    from engine.rundir import read_events

    return any(e["type"] == "log" and e["step"] >= at_least for e in read_events(run_dir))


def runs_json(cwd: Path) -> list[dict]:
    result = tuner("runs", "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def start_detached(home: Path, name: str, *extra: str) -> tuple[Path, str]:
    work = home / "project"
    work.mkdir(exist_ok=True)
    result = tuner("train", *RUN, "--output_dir", name, "--detach", *extra, cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("started run ")
    run_id = result.stdout.split()[2]
    return work / name, run_id


def stops_and_resumes(out: Path) -> None:
    """A detached run of any stage, stopped after three logged steps: it ends "stopped" with a checkpoint at its
    step; resumed, it goes on from that checkpoint (and is stopped again)."""
    from engine.rundir import read_status

    def typed(*args: str) -> None:
        done = tuner(*args, cwd=Path.cwd())
        assert done.returncode == 0, done.stdout + done.stderr

    wait_for(lambda: logged(out, 3), 120, "three logged steps")
    typed("stop", str(out))
    wait_for(lambda: read_status(out).state == "stopped", 120, "the run to stop")
    stopped = read_status(out)
    assert (out / f"checkpoint-{stopped.step}").is_dir()
    typed("resume", str(out))
    wait_for(lambda: logged(out, stopped.step + 1), 120, "a step after the resume")
    typed("stop", str(out))
    wait_for(lambda: read_status(out).state == "stopped", 120, "the resumed run to stop")
    assert f"resuming from {out / f'checkpoint-{stopped.step}'}" in (out / "train.log").read_text()
