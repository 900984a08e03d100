"""``tuner download MODEL``: a hub model into the local Hugging Face cache before any run, checked first (access,
safetensors, disk), with its progress (bytes, speed, ETA), resumable after an interruption.

The plan and the progress go to stderr, the snapshot directory to stdout, so ``path=$(tuner download org/name)``
works; a bar on a terminal, a plain line every PLAIN_EVERY_S otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext

from engine.config.argv import take_flag, take_option
from engine.errors import UserError

EXIT_INTERRUPTED = 130
PLAIN_EVERY_S = 5.0
NO_DOWNLOAD = {"local": "a local directory", "demo": "a demo model, built on this machine",
               "hub-cache": "already in the Hugging Face cache"}


def cmd_download(argv: list[str]) -> int:
    as_json = take_flag(argv, "--json")
    revision = take_option(argv, "--revision")
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UserError("`tuner download` takes one model",
                        hint="a hub id like org/name, or a name from `tuner models`")
    from engine.models.download import DownloadProgress, download, human_bytes
    from engine.models.resolve import resolve_model

    name = argv[0]
    resolved = resolve_model(name, revision=revision)
    plan = resolved.plan
    if plan is None:
        if as_json:
            print(json.dumps({"model": name, "source": resolved.source, "path": resolved.path, "downloaded_bytes": 0}))
        else:
            print(f"{name} needs no download: {NO_DOWNLOAD[resolved.source]}", file=sys.stderr)
            print(resolved.path)
        return 0
    if not as_json:
        held = plan.total_bytes - plan.missing_bytes
        resumed = f", {human_bytes(held)} of it already here" if held else ""
        print(f"{plan.hub_id} ({plan.revision}, commit {plan.commit[:12]}): {len(plan.files)} files, "
              f"{human_bytes(plan.total_bytes)}{resumed}", file=sys.stderr)
        for file in plan.files:
            print(f"  {file.name:<40} {human_bytes(file.size):>10}", file=sys.stderr)
        print(f"{human_bytes(plan.free_bytes)} free at {plan.cache_dir}", file=sys.stderr)
    last: list[DownloadProgress] = []

    def remember(progress: DownloadProgress) -> None:
        last[:] = [progress]

    show, live = (remember, nullcontext()) if as_json else progress_display(remember)
    try:
        with live:
            path = download(plan, show)
    except KeyboardInterrupt:
        done = last[0].done_bytes if last else plan.total_bytes - plan.missing_bytes
        print(f"tuner: download interrupted at {human_bytes(done)} of {human_bytes(plan.total_bytes)}; the part "
              f"fetched is kept: `tuner download {name}` again continues it", file=sys.stderr)
        return EXIT_INTERRUPTED
    if as_json:
        print(json.dumps({"model": name, "source": "hub", "hub_id": plan.hub_id, "revision": plan.revision,
                          "commit": plan.commit, "path": str(path), "downloaded_bytes": plan.missing_bytes,
                          "total_bytes": plan.total_bytes, "free_bytes": plan.free_bytes,
                          "files": [{"name": f.name, "size": f.size} for f in plan.files]}))
    else:
        print(path)
    return 0


def progress_display(remember=lambda progress: None):
    """How a download shows on stderr: a Rich bar on a terminal, else a plain line every PLAIN_EVERY_S; the function
    that takes each DownloadProgress (passing it on to ``remember``) and the context during which it shows."""
    return _bar(remember) if sys.stderr.isatty() else (_plain(remember), nullcontext())


def _plain(remember):
    """A line on stderr every PLAIN_EVERY_S and at the end, for a log file or a pipe."""
    from engine.models.download import progress_line  # what both faces show of a download

    printed = [-float("inf")]

    def show(progress) -> None:
        remember(progress)
        now = time.monotonic()
        if now - printed[0] >= PLAIN_EVERY_S or progress.done_bytes >= progress.total_bytes:
            printed[0] = now
            print(progress_line(progress), file=sys.stderr, flush=True)

    return show


def _bar(remember):
    """A Rich bar on stderr (the file, bytes done of the total, the speed and the ETA the download measures), and
    the context that shows it."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from engine.models.download import eta_clock, human_bytes

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[speed]}"),
                   TextColumn("ETA {task.fields[eta]}"), console=Console(stderr=True), transient=False)
    task = None

    def show(progress) -> None:
        nonlocal task
        remember(progress)
        speed = f"{human_bytes(progress.speed_bytes_s)}/s" if progress.speed_bytes_s is not None else "?/s"
        fields = dict(description=progress.file, completed=progress.done_bytes, speed=speed,
                      eta=eta_clock(progress.eta_s))
        if task is None:
            task = bar.add_task(total=progress.total_bytes, **fields)
        else:
            bar.update(task, **fields)

    return show, bar
