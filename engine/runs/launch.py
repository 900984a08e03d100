"""One way to start work on a run directory, for the CLI, the wizard and `tuner resume` alike.

``start_run`` takes the directory's lock, decides once whether the run starts afresh or resumes, writes the config the
run will read (absolute paths, no one-shot keys, no secrets) and its first status, then runs the worker here or as a
process of its own session (detached: a closed terminal or a dropped SSH never reaches it), which reads only that file.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from engine.config.schema import TunerConfig, build_config, read_config_file
from engine.errors import UserError
from engine.rundir.checkpoints import checkpoints, last_complete
from engine.rundir.files import open_append, printable_line, write_text_atomic
from engine.rundir.index import register
from engine.rundir.lock import LOCK_FD_ENV, LOCK_FILE, RunLock
from engine.rundir.run import RunDir
from engine.world import is_main_process
from engine.rundir.process import pid_start_time
from engine.rundir.status import UNREADABLE, RunStatus, new_run_id, read_status, write_status
from engine.runs.stop import blocked_stop_signals
from engine.rundir.layout import CONFIG, RUN_FILES, TRAIN_LOG

CONFIG_FILE = CONFIG
ONE_SHOT = {"overwrite_output_dir": False, "resume_from_checkpoint": None, "overwrite_cache": False}


def default_output_dir(model_name: str, method: str) -> Path:
    return Path("saves") / Path(model_name.rstrip("/")).name / method / datetime.now().strftime("%Y%m%d-%H%M%S")


def method_label(cfg: TunerConfig) -> str:
    """What `tuner runs` and the dashboard show as the run's method: the stage too, when it is not sft ("dpo-lora")."""
    bits = cfg.model.quantization_bit
    method = f"qlora-{bits}bit" if bits else cfg.finetune.finetuning_type
    return method if cfg.finetune.stage == "sft" else f"{cfg.finetune.stage}-{method}"


def output_path(cfg: TunerConfig) -> Path:
    t = cfg.train
    path = Path(t.output_dir) if t.output_dir else default_output_dir(cfg.model.model_name_or_path,
                                                                      cfg.finetune.finetuning_type)
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {path} is a file, not a directory", "choose a directory for the run")
    return path.absolute()


def with_run_directory(cfg: TunerConfig, visible_devices: str | None = None) -> TunerConfig:
    """``cfg`` (a copy) with output_dir resolved, once, to the run's directory: absolute, the default one
    (saves/<model>/<method>/<time>) stamped now. Everything after takes the directory from here, or from the RunDir
    built on it; a resolved config resolves to itself. A run over several machines must name it: each would stamp
    its own."""
    if not cfg.train.output_dir and _launch_plan(cfg, visible_devices).nnodes > 1:
        raise UserError("a run over several machines needs output_dir: the same path on every machine, on storage "
                        "they share")
    resolved = copy.deepcopy(cfg)
    resolved.train.output_dir = str(output_path(cfg))
    return resolved


def start_run(cfg: TunerConfig, detach: bool, force: bool = False, view=None, visible_devices: str | None = None):
    """Start training ``cfg``: detached, the started run's status (its process holds the lock, and sees only
    ``visible_devices`` when given); else the exit code of the run trained in this process, shown in ``view``
    (engine.cli.train_view) when given."""
    from engine.runs.stop import StopRequest

    stop = None if detach and is_main_process() else StopRequest().install()  # a launched rank trains here
    try:
        plan = _launch_plan(cfg, visible_devices)
        cfg = with_run_directory(cfg, visible_devices)
        path = Path(cfg.train.output_dir)
        if not is_main_process():
            from engine.train.runner import run_training

            resume = None if cfg.train.overwrite_output_dir else _resume_point(cfg, path)
            return run_training(cfg, RunDir(path, resume, RunStatus(id="", name=path.name)), stop)
        if plan.distributed:  # refused here, before a directory, rather than in every rank
            from engine.hardware import probe
            from engine.hardware import check_machine

            check_machine(cfg.train.strategy, bool(probe().gpus))
        if plan.distributed and not plan.main_node:
            return _other_node(cfg, path, plan, detach, stop)
        from engine.models.resolve import resolve_configured

        resolve_configured(cfg.model)  # a model nowhere, gated, or too big for the disk: refused before a directory
        with _writing(path):
            path.mkdir(parents=True, exist_ok=True)
        with RunLock.acquire(path) as lock:
            with _writing(path):
                run = _claim(cfg, path)
                saved = saved_config(cfg, path)
                if plan.distributed:  # a resume starts as many processes, whatever the machine shows then
                    saved.train.nproc_per_node = plan.nproc_per_node
                write_text_atomic(path / CONFIG_FILE, saved.to_yaml())
                write_status(path, run.status)
                register(path, run.status.id)
                if detach:
                    return _spawn(run, lock, force, cfg.model.hf_hub_token, visible_devices, cfg.data.overwrite_cache)
            if plan.distributed:
                from engine.runs.supervise import supervise

                return supervise(run, plan, stop, force, cfg.data.overwrite_cache, token=cfg.model.hf_hub_token,
                                 echo=sys.stderr if view is not None else None)
            from engine.runs.gpu_queue import turn
            from engine.train.runner import run_training

            saved.model.hf_hub_token = cfg.model.hf_hub_token
            saved.data.overwrite_cache = cfg.data.overwrite_cache  # one-shot: this start, never its config.yaml
            return run_training(saved, run, stop, view=view, gpu_turn=turn(force))
    finally:
        if stop is not None:
            stop.uninstall()


def _launch_plan(cfg: TunerConfig, visible_devices: str | None):
    """The run's processes; one, as always, inside a process that a launcher (the user's torchrun) started."""
    from engine.world import LaunchPlan, in_launched_process, launch_plan

    if in_launched_process():
        given = {key: getattr(cfg.train, key) for key in ("nproc_per_node", "nnodes", "node_rank", "master_addr",
                                                          "master_port") if getattr(cfg.train, key) is not None}
        if given:
            raise UserError(f"{', '.join(given)} given to a process that a launcher (torchrun) started: the launcher "
                            "decided them already", "leave them out, or start `tuner train` without torchrun")
        return LaunchPlan(1, 1, 0, "", None)
    return launch_plan(cfg, gpu_count=len(visible_devices.split(",")) if visible_devices else None)


def _other_node(cfg: TunerConfig, path: Path, plan, detach: bool, stop) -> int:
    """A machine other than node 0: its processes join node 0's, and node 0's run directory records the run."""
    from engine.runs.supervise import follow_node

    if detach:
        raise UserError(f"--detach starts a run from node 0; node_rank {plan.node_rank} joins it in the foreground",
                        "run this machine's command without --detach (under srun, tmux or nohup)")
    resume = None if cfg.train.overwrite_output_dir else _resume_point(cfg, path)  # node 0's, on the shared disk
    saved = saved_config(cfg, path)
    return follow_node(saved, plan, stop, saved.to_yaml(), resume, token=cfg.model.hf_hub_token)


def resume_run(run_dir: Path, hf_hub_token: str | None = None) -> RunStatus:
    """Start a stopped or failed run again, detached, from its config.yaml and its newest whole checkpoint (and the
    hub token a gated or private model needs: config.yaml never holds one)."""
    config = Path(run_dir) / CONFIG_FILE
    if not config.is_file():
        there = config.exists() or config.is_symlink()
        raise UserError(f"{run_dir}'s {CONFIG_FILE} is not a regular file (a link to a device, a FIFO?): nothing to "
                        "resume with" if there else f"{run_dir} has no {CONFIG_FILE} to resume with")
    # the directory named, wherever config.yaml says it was (a run directory may have been moved)
    cfg = build_config({**read_config_file(config), "output_dir": str(Path(run_dir).absolute()),
                        "hf_hub_token": hf_hub_token})
    return start_run(cfg, detach=True, visible_devices=_gpus_of(read_status(Path(run_dir)), cfg))


def _gpus_of(previous: RunStatus | None, cfg: TunerConfig) -> str | None:
    """CUDA_VISIBLE_DEVICES for a resume: the GPUs the run held before, when they are this host's, all known by UUID
    and enough for its processes; else None (the GPUs as this machine shows them)."""
    import socket

    if previous is None or previous.host != socket.gethostname() or not previous.gpus:
        return None
    if not all(gpu.startswith(("GPU-", "MIG-")) for gpu in previous.gpus):
        return None
    if len(previous.gpus) < (cfg.train.nproc_per_node or 1):
        return None
    return ",".join(previous.gpus)


def _refuse_links(path: Path) -> None:
    """What the Trainer writes into a run directory (the model card README.md, weights, a checkpoint-N directory) it
    writes through a symbolic link planted in its place, into wherever that points: a link there that leads out of
    the directory is refused (one of the user's own within it, such as latest -> checkpoint-500, is fine)."""
    inside = path.resolve()
    for child in sorted(path.iterdir()):
        if child.is_symlink() and not child.resolve().is_relative_to(inside):
            raise UserError(f"{printable_line(child)} is a symbolic link: tuner does not write through links in a run "
                            "directory", "remove the link")


def _claim(cfg: TunerConfig, path: Path) -> RunDir:
    """Decide, under the lock, whether the run starts afresh or resumes; a finished run is never overwritten by
    accident, nor a directory another tool wrote."""
    t = cfg.train
    _refuse_links(path)  # before anything is removed or written
    previous = read_status(path)
    if t.overwrite_output_dir:
        for child in checkpoints(path):
            shutil.rmtree(child)
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        previous = None
    if previous and previous.state == UNREADABLE:
        raise UserError(f"{previous.error}", "set overwrite_output_dir true to start afresh in this directory")
    if previous and previous.state == "completed" and t.resume_from_checkpoint is None:
        raise UserError(f"output_dir {path} holds a completed run",
                        "choose another output_dir, or set overwrite_output_dir true to replace it")
    resume_from = _resume_point(cfg, path)
    if resume_from is None and previous is None and not t.overwrite_output_dir and \
            any(p.name != LOCK_FILE for p in path.iterdir()):
        raise UserError(f"output_dir {path} is not empty and holds no run of tuner's",
                        "choose an empty or new directory, or set overwrite_output_dir true")
    status = RunStatus(id=previous.id if previous else new_run_id(), name=t.run_name or path.name, state="queued",
                       output_dir=str(path), model=cfg.model.model_name_or_path, method=method_label(cfg))
    status.pid, status.pid_started_at = os.getpid(), pid_start_time(os.getpid())
    if previous and resume_from:  # a resumed run shows where it stands until its first new log
        status.step, status.total_steps, status.loss = previous.step, previous.total_steps, previous.loss
    return RunDir(path, resume_from, status)


def _resume_point(cfg: TunerConfig, path: Path) -> str | None:
    asked = cfg.train.resume_from_checkpoint
    if asked is not None and str(asked).lower() == "false":
        return None
    if asked is None or str(asked).lower() == "true":
        found = last_complete(path) if path.is_dir() else None
        if asked is not None and found is None:
            raise UserError(f"resume_from_checkpoint true, but {path} has no whole checkpoint-* directory to "
                            "resume from")
        return str(found) if found else None
    if not Path(asked).is_dir():
        raise UserError(f"resume_from_checkpoint {asked} is not a directory")
    return str(Path(asked).absolute())


PASSTHROUGH_PATHS = ("fsdp_config", "accelerator_config")


def saved_config(cfg: TunerConfig, run_dir: Path) -> TunerConfig:
    """The config a run reads back: one-shot keys reset (a resume never wipes its own checkpoints again), every
    local path made absolute (a resume starts in any directory), the output_dir the run's own."""
    from engine.data.registry import absolute_dataset_dir, load_registry

    saved = copy.deepcopy(cfg)
    for key, value in ONE_SHOT.items():
        setattr(saved.train if hasattr(saved.train, key) else saved.data, key, value)
    m, d, t = saved.model, saved.data, saved.train
    m.model_name_or_path = _absolute_if_local(m.model_name_or_path)
    m.adapter_name_or_path = _absolute_list(m.adapter_name_or_path, ())
    m.cache_dir = _absolute_if_local(m.cache_dir)
    d.dataset_dir = absolute_dataset_dir(d.dataset_dir)
    registered = set(load_registry(d.dataset_dir)) if d.dataset or d.eval_dataset else set()
    d.dataset = _absolute_list(d.dataset, registered)
    d.eval_dataset = _absolute_list(d.eval_dataset, registered)
    t.deepspeed = _absolute_if_local(t.deepspeed)
    for key in PASSTHROUGH_PATHS:  # TrainingArguments fields that may name a JSON file
        if isinstance(saved.passthrough.get(key), str):
            saved.passthrough[key] = _absolute_if_local(saved.passthrough[key])
    t.output_dir = str(run_dir)
    return saved


def _absolute_if_local(value: str | None) -> str | None:
    return str(Path(value).expanduser().absolute()) if value and Path(value).expanduser().exists() else value


def _absolute_list(value: str | None, names) -> str | None:
    if not value:
        return value
    return ",".join(part if part in names else _absolute_if_local(part) for part in
                    (p.strip() for p in value.split(",")) if part)


def _spawn(run: RunDir, lock: RunLock, force: bool, token: str | None, visible_devices: str | None,
           overwrite_cache: bool = False) -> RunStatus:
    """The worker as a process of its own session, holding the directory's lock, its output appended to
    train.log, started in / so nothing in the run directory shadows a module. Stop signals stay blocked until its
    handlers are in; a token travels in its environment only."""
    env = dict(os.environ, **{LOCK_FD_ENV: str(lock.fd)})
    if token:
        env["HF_TOKEN"] = token
    if visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices
    argv = [sys.executable, "-m", "engine.runs.worker", str(run.path)] + (["--force"] if force else []) + \
        (["--overwrite-cache"] if overwrite_cache else []) + \
        (["--resume-from", run.resume_from] if run.resume_from else [])
    with open_append(run.path / TRAIN_LOG) as log, blocked_stop_signals():
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, pass_fds=(lock.fd,), env=env, cwd="/")
    run.status.pid, run.status.pid_started_at = process.pid, pid_start_time(process.pid)
    current = read_status(run.path)
    if current is not None and current.pid == os.getpid():  # the worker has not written its own yet
        write_status(run.path, run.status)
    return run.status


@contextmanager
def _writing(path: Path):
    """Preparing the run directory: an OS error (not a directory, read-only, full) is one line naming the path."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write the run directory {exc.filename or path}: {exc.strerror or exc}") from None
