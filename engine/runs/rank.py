"""One process of a supervised multi-process run, as torchrun starts it:
``python -m engine.runs.rank RUN_DIR --config FILE [--overwrite-cache] [--resume-from CHECKPOINT]``.

Rank 0 writes the run directory (its status.json names the supervisor, whose process the run is); the others train
and log their warnings and errors, tagged with their rank. SIGINT (the supervisor passing a stop on) finishes the
step every rank agrees on; SIGTERM is torchrun ending the run because another rank died: this one exits at once.
Every rank leaves a last word for the supervisor (ended well, torn down, or its error), which records why a run
failed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger("tuner")

TORN_DOWN_EXIT = 128 + signal.SIGTERM


def main(argv: list[str]) -> int:
    from engine.runs.stop import StopRequest

    stop = StopRequest().install()
    run_dir = Path(argv[0]).absolute()
    # torchrun ends a rank with SIGTERM when another died; under Slurm, SIGTERM is the job's end, which the
    # supervisor gets too and passes on as a stop (SIGKILL follows after Slurm's KillWait)
    from engine.world import under_slurm

    signal.signal(signal.SIGTERM, signal.SIG_IGN if under_slurm() else _torn_down(run_dir))
    from engine.config.schema import build_config, read_config_file
    from engine.errors import UserError
    from engine.quiet import quiet_libraries
    from engine.rundir.run import RunDir
    from engine.world import is_main_process
    from engine.rundir.status import RunStatus, read_status
    from engine.runs.supervise import write_last_word
    from engine.train.logs import setup_rank_logging

    config = Path(argv[argv.index("--config") + 1])
    resume_from = argv[argv.index("--resume-from") + 1] if "--resume-from" in argv else None
    rank = int(os.environ.get("RANK", "0"))
    quiet_libraries()
    handlers = [] if is_main_process() else setup_rank_logging()
    try:
        cfg = build_config(read_config_file(config))  # its directory is run_dir, the RunDir below
        cfg.data.overwrite_cache = "--overwrite-cache" in argv
        status = read_status(run_dir) if is_main_process() else None
        if status is None:
            status = RunStatus(id="", name=run_dir.name)
        from engine.train.runner import run_training

        run_training(cfg, RunDir(run_dir, resume_from, status, supervised=True), stop)  # the supervisor took the GPUs
        write_last_word(run_dir, rank, "ok")
        return 0  # completed or stopped, as status.json says: the supervisor's exit code tells which
    except UserError as exc:
        write_last_word(run_dir, rank, "error", str(exc), user_error=True)
        if not is_main_process():
            log.error("%s", exc)
        return 2
    except BaseException as exc:
        write_last_word(run_dir, rank, "error", f"{type(exc).__name__}: {exc}".splitlines()[0])
        if not is_main_process():
            log.exception("training failed")
        return 1
    finally:
        for handler in handlers:
            handler.flush()


def _torn_down(run_dir: Path):
    """The SIGTERM handler: torchrun ends this rank because another one died (or a stop came before the ranks
    could agree): out at once, no checkpoint, a last word saying so."""

    def handle(signum, frame):
        from engine.runs.supervise import write_last_word

        write_last_word(run_dir, int(os.environ.get("RANK", "0")), "torn_down")
        sys.stderr.flush()
        os._exit(TORN_DOWN_EXIT)

    return handle


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
