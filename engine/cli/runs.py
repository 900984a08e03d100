"""Commands on runs as jobs: list them, follow their logs, stop and resume them."""

from __future__ import annotations

import dataclasses
import json
import sys

from engine.config.argv import no_more, take_flag, take_option, take_run
from engine.cli.console import say
from engine.errors import UserError


def cmd_runs(argv: list[str]) -> int:
    as_json = take_flag(argv, "--json")
    no_more(argv, "runs")
    from engine.rundir.files import printable_line
    from engine.rundir.jobs import JOB_COLUMNS, job_row, list_jobs, log_tail

    jobs = list_jobs()
    if as_json:
        print(json.dumps([_job_json(job) for job in jobs], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not jobs:
        console.print("no runs yet: start one with `tuner train ... --detach`")
        return 0
    rows = [job_row(job) for job in jobs]
    columns = fitting_columns(rows, console.width)
    table = Table(box=None, header_style="bold", pad_edge=False, collapse_padding=True)
    for column in columns:  # model, method and name give way (…) when the terminal is narrow; the rest never do
        squeezable = column in ("name", "model", "method")
        table.add_column(column, no_wrap=True, overflow="ellipsis",
                         min_width=None if squeezable else max(len(column), *(len(r[column]) for r in rows)))
    for row in rows:
        table.add_row(*(Text(row[column]) for column in columns))
    console.print(table)
    if len(columns) < len(JOB_COLUMNS):
        console.print(Text(f"({', '.join(c for c in JOB_COLUMNS if c not in columns)} left out to fit "
                           f"{console.width} columns; --json has everything)", style="dim"))
    for job in jobs:
        if job.state == "unreadable":
            console.print(Text(f"{job.id}: {printable_line(job.status.error)}", style="bold red"), soft_wrap=True)
        elif job.state == "failed":
            console.print(Text(f"{job.id} failed; the end of {printable_line(job.dir / 'train.log')}:",
                               style="bold red"), soft_wrap=True)
            for line in log_tail(job):
                console.print(Text(f"  {line}", style="dim"), soft_wrap=True)
    return 0


def fitting_columns(rows: list[dict[str, str]], width: int) -> list[str]:
    """JOB_COLUMNS, less "started" and then "name" while the table is wider than the terminal."""
    from engine.rundir.jobs import JOB_COLUMNS

    columns = list(JOB_COLUMNS)
    for optional in ("started", "name"):
        needed = sum(max(len(c), *(len(r[c]) for r in rows)) for c in columns) + len(columns) - 1
        if needed <= width:
            break
        columns.remove(optional)
    return columns


def _job_json(job) -> dict:
    from engine.rundir.jobs import log_tail

    status = dataclasses.asdict(job.status) if job.status else None
    return {"id": job.id, "dir": str(job.dir), "state": job.state, "status": status, "last_log": job.last_log,
            "log_tail": log_tail(job) if job.state == "failed" else []}


def cmd_logs(argv: list[str]) -> int:
    follow_on = take_flag(argv, "-f", "--follow")
    from engine.rundir.jobs import find_job, follow
    from engine.rundir.layout import TRAIN_LOG
    from engine.rundir.process import is_run_process

    job = find_job(take_run(argv, "logs"))
    log_file = job.dir / TRAIN_LOG
    if not log_file.is_file():
        there = log_file.exists() or log_file.is_symlink()
        raise UserError(f"run {job.id}'s train.log in {job.dir} is not a regular file (a link to a device, a FIFO?)"
                        if there else f"run {job.id} has no train.log in {job.dir}")
    follow(log_file, sys.stdout, follow_on, alive=lambda: job.status is not None and is_run_process(job.status))
    return 0


def cmd_stop(argv: list[str]) -> int:
    from engine.rundir.jobs import find_job, stop_job
    from engine.rundir.status import read_status

    job = find_job(take_run(argv, "stop"))
    state = stop_job(job, wait_s=30.0)
    status = read_status(job.dir)
    step = f" at step {status.step}" if status and state == "stopped" else ""
    print(f"run {job.id}: {state}{step}" + ("; `tuner resume` continues it" if state == "stopped" else ""))
    return 0


def _check_trust(job, given: str | None) -> None:
    """A run directory is a file anyone can craft: a config.yaml that turns on trust_remote_code (the model's own
    Python code runs) is followed only when the resume asks for it too."""
    from engine.infer.followup import run_config_values
    from engine.rundir.files import printable_line
    from engine.rundir.layout import CONFIG

    wanted = job.readable and not job.foreign and (job.dir / CONFIG).is_file() and \
        run_config_values(job).get("trust_remote_code") is True
    if given is not None and (given.lower() != "true" or not wanted):
        raise UserError(f"--trust_remote_code {printable_line(given)}: a run resumes with its own config, and run "
                        f"{job.id}'s {'turns it on' if wanted else 'does not use it'}",
                        "give --trust_remote_code true only to resume a run whose config.yaml turns it on"
                        if wanted else "leave it out")
    if wanted and given is None:
        model = printable_line(job.status.model or "its model")
        raise UserError(f"run {job.id}'s config.yaml turns on trust_remote_code: the Python code that ships with "
                        f"{model} would run, and tuner never takes that from a run directory's files",
                        f"`tuner resume {job.id} --trust_remote_code true` if you trust that code")


def cmd_resume(argv: list[str]) -> int:
    """Start a stopped or failed run again with its own config; it continues from its newest whole checkpoint."""
    from engine.rundir.jobs import failure_reason, find_job
    from engine.runs.launch import resume_run

    token = take_option(argv, "--hf_hub_token")  # never in config.yaml: a gated or private model asks again
    trust = take_option(argv, "--trust_remote_code")
    job = find_job(take_run(argv, "resume", ": a run resumes with the config it started with, its config.yaml"))
    if job.foreign:
        raise UserError(f"{job.dir} was written by another tool: tuner only reads it")
    if not job.readable:
        raise UserError(f"run {job.id} cannot be resumed: {failure_reason(job) or 'its directory is gone'}")
    if job.state in ("running", "queued"):
        raise UserError(f"run {job.id} is still {job.state}")
    if job.state == "completed":
        raise UserError(f"run {job.id} is completed: nothing to resume")
    _check_trust(job, trust)
    status = resume_run(job.dir, token)
    say(f"resumed run {status.id} (pid {status.pid}) in {status.output_dir}", hang=2)
    return 0
