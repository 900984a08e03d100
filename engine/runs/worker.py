"""The process a detached run is:
``python -m engine.runs.worker RUN_DIR [--force] [--overwrite-cache] [--resume-from CHECKPOINT]``.

It installs its stop handlers before anything else (its launcher started it with the stop signals blocked), keeps
the directory's lock its launcher handed down, and trains from the run's config.yaml and nothing else (but the
one-shot choices of this start, which config.yaml never keeps).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from engine.runs.stop import StopRequest

    stop = StopRequest().install()
    from engine.config.schema import build_config, read_config_file
    from engine.errors import UserError
    from engine.quiet import quiet_libraries
    from engine.runs.launch import CONFIG_FILE, method_label
    from engine.rundir.run import RunDir
    from engine.rundir.lock import RunLock
    from engine.rundir.process import own_identity
    from engine.rundir.status import UNREADABLE, read_status

    run_dir = Path(argv[0]).absolute()
    force = "--force" in argv
    resume_from = argv[argv.index("--resume-from") + 1] if "--resume-from" in argv else None
    quiet_libraries()
    lock = RunLock.inherited(run_dir)
    try:
        lock = lock or RunLock.acquire(run_dir)
        cfg = build_config(read_config_file(run_dir / CONFIG_FILE))
        cfg.data.overwrite_cache = "--overwrite-cache" in argv
        status = read_status(run_dir)
        if status is None or status.state == UNREADABLE:
            raise UserError(f"{run_dir} has no readable status.json: start the run with `tuner train`")
        status.pid, status.pid_started_at = own_identity()
        status.method = status.method or method_label(cfg)
        from engine.world import launch_plan

        plan = launch_plan(cfg)
        if plan.distributed:
            import os

            from engine.runs.supervise import supervise

            return supervise(RunDir(run_dir, resume_from, status), plan, stop, force, cfg.data.overwrite_cache,
                             token=os.environ.get("HF_TOKEN"))
        from engine.runs.gpu_queue import turn
        from engine.train.runner import run_training

        return run_training(cfg, RunDir(run_dir, resume_from, status), stop, gpu_turn=turn(force))
    except UserError as exc:
        print(f"tuner: error: {exc}", file=sys.stderr)
        _record_refusal(run_dir, str(exc))
        return 2
    finally:
        if lock is not None:
            lock.release()


def _record_refusal(run_dir: Path, message: str) -> None:
    """A run refused before training could record it (its config unreadable, ...) says so in its status too."""
    from engine.rundir.status import now_iso, read_status, write_status

    status = read_status(run_dir)
    if status is not None and status.state in ("queued", "running"):
        status.state, status.error, status.ended_at, status.exit_code = "failed", message, now_iso(), 2
        try:
            write_status(run_dir, status)
        except OSError as exc:
            print(f"tuner: error: could not record it in {run_dir / 'status.json'}: {exc.strerror}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
