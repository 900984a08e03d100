"""Predict and export started like a run (their own process and session, so leaving the app or losing SSH does not
stop them), each writing a result file that whoever started it reads: no one parses another process's output.

``python -m engine.runs.tasks COMMAND RESULT_FILE [ARGS...]`` is that process: it writes RESULT_FILE when it starts
(state running, its pid and start time), as predict goes (samples done of the total, time left) and when it ends
(completed with a summary, or failed with the error).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.rundir.files import open_append, printable, read_json, write_json_atomic
from engine.rundir.process import is_alive, own_identity, pid_start_time
from engine.rundir.status import now_iso

COMMANDS = ("predict", "export")


@dataclass(frozen=True)
class TaskResult:
    command: str
    state: str  # running | completed | failed
    pid: int | None = None
    pid_started_at: float | None = None
    started_at: str | None = None
    ended_at: str | None = None
    exit_code: int | None = None
    error: str | None = None
    summary: tuple[str, ...] = field(default_factory=tuple)
    done: int | None = None  # predict: samples predicted so far, of ``total``
    total: int | None = None
    remaining_s: float | None = None  # predict: time left at the pace so far

    @property
    def alive(self) -> bool:
        """Running, and its process (pid and start time) is still there."""
        return self.state == "running" and is_alive(self.pid, self.pid_started_at)


def result_path_for(log_path: Path) -> Path:
    return Path(log_path).with_suffix(".result.json")


def start_task(command: str, argv: list[str], log_path: Path) -> TaskResult:
    """Start `tuner COMMAND ARGV` as a task; its output is appended to ``log_path``, its result beside it."""
    if command not in COMMANDS:
        raise ValueError(command)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path = result_path_for(log_path)
    result_path.unlink(missing_ok=True)  # an earlier task's result is not this one's
    with open_append(log_path) as log:
        process = subprocess.Popen([sys.executable, "-m", "engine.runs.tasks", command, str(result_path), *argv],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    started = TaskResult(command, "running", process.pid, pid_start_time(process.pid), now_iso())
    if read_task(result_path) is None:
        _write(result_path, started)
    return started


def read_task(result_path: Path) -> TaskResult | None:
    """The task's result file; None before it exists, state failed with the reason when it is not one of ours."""
    try:
        data = read_json(result_path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return TaskResult("?", "failed", error=f"{result_path} cannot be read: {exc}")
    if not _is_result(data):
        return TaskResult("?", "failed", error=f"{result_path} is not a task result")
    values = {f.name: data[f.name] for f in dataclasses.fields(TaskResult) if f.name in data}
    values["summary"] = tuple(printable(line) for line in values.get("summary") or ())
    if values.get("error") is not None:
        values["error"] = printable(values["error"])
    return TaskResult(**values)


def _is_result(data) -> bool:
    def optional(key, *kinds):
        return data.get(key) is None or (isinstance(data[key], kinds) and not isinstance(data[key], bool))

    return (isinstance(data, dict) and data.get("state") in ("running", "completed", "failed")
            and isinstance(data.get("command"), str) and optional("pid", int) and optional("exit_code", int)
            and optional("pid_started_at", int, float) and optional("started_at", str) and optional("ended_at", str)
            and optional("error", str) and optional("done", int) and optional("total", int)
            and optional("remaining_s", int, float) and isinstance(data.get("summary", []), list)
            and all(isinstance(line, str) for line in data.get("summary", [])))


def _write(path: Path, result: TaskResult) -> None:
    write_json_atomic(path, dataclasses.asdict(result))


class PredictProgress:
    """Records predict's progress in the result file after each batch and, every ``PRINT_S``, says it in the log."""

    PRINT_S = 5.0

    def __init__(self, result_path: Path, result: TaskResult):
        self.result_path, self.result = result_path, result
        self.started = self.printed = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0:
            self.started = now
            print(f"model loaded: predicting {total} samples", flush=True)
            remaining = None
        else:
            remaining = round((now - self.started) / done * (total - done), 1)
        self.result = dataclasses.replace(self.result, done=done, total=total, remaining_s=remaining)
        _write(self.result_path, self.result)
        if done and (done == total or now - self.printed >= self.PRINT_S):
            self.printed = now
            print(f"{done} of {total} predicted" + (f", {remaining:.0f} s left" if done < total else ""),
                  flush=True)


def _run(command: str, argv: list[str], result_path: Path, result: TaskResult) -> tuple[list[str], TaskResult]:
    """The command's summary lines, and the result as last written (predict's progress on it)."""
    from engine.infer.followup import load_followup_config

    cfg = load_followup_config(argv, command)
    if command == "predict":
        from engine.infer.predict import predict, summary_lines

        progress = PredictProgress(result_path, result)
        print("loading the dataset and the model", flush=True)
        lines = summary_lines(*predict(cfg, progress))
        return lines, progress.result
    from engine.infer.export import export_model, render_summary

    return render_summary(export_model(cfg)).splitlines(), result


def main(argv: list[str]) -> int:
    from engine.quiet import quiet_libraries

    command, result_path, rest = argv[0], Path(argv[1]), argv[2:]
    quiet_libraries()
    pid, started_at = own_identity()
    result = TaskResult(command, "running", pid, started_at, now_iso())
    _write(result_path, result)
    try:
        summary, result = _run(command, rest, result_path, result)
    except UserError as exc:
        print(f"tuner: error: {exc}", file=sys.stderr, flush=True)
        _write(result_path, dataclasses.replace(result, state="failed", ended_at=now_iso(), exit_code=2,
                                                error=str(exc)))
        return 2
    except BaseException as exc:
        traceback.print_exc()
        _write(result_path, dataclasses.replace(result, state="failed", ended_at=now_iso(), exit_code=1,
                                                error=f"{type(exc).__name__}: {exc}"))
        return 1
    for line in summary:
        print(line, flush=True)
    _write(result_path, dataclasses.replace(result, state="completed", ended_at=now_iso(), exit_code=0,
                                            summary=tuple(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
