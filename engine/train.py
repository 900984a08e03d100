"""Supervised fine-tuning: the config in, a run directory out (DESIGN.md's contract).

``run_training`` reads top-down: resolve the model, prepare the run directory (or resume in it), load data and model,
build TRL's SFTTrainer with the callbacks that write the run's files, train, save, and record how it ended.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine.config import TunerConfig
from engine.errors import UserError
from engine.quiet import quiet_libraries
from engine.jobs import register
from engine.runs import EventWriter, RunStatus, new_run_id, now_iso, read_status, write_status

log = logging.getLogger("tuner")

RUN_FILES = ("status.json", "events.jsonl", "trainer_log.jsonl", "train.log", "config.yaml")


@dataclass
class RunDir:
    path: Path
    resume_from: str | None
    status: RunStatus


def default_output_dir(model_name: str, method: str) -> Path:
    return Path("saves") / Path(model_name.rstrip("/")).name / method / datetime.now().strftime("%Y%m%d-%H%M%S")


def _checkpoints(path: Path) -> list[Path]:
    found = [p for p in path.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def is_main_process() -> bool:
    """Under torchrun / accelerate every process trains, but only rank 0 writes the run directory's files."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_run_dir(cfg: TunerConfig, model_name: str) -> RunDir:
    """Decide where the run writes and whether it resumes: an output_dir with checkpoints resumes from the last one
    unless overwrite_output_dir; a finished run there is never overwritten by accident."""
    t = cfg.train
    path = Path(t.output_dir) if t.output_dir else default_output_dir(model_name, cfg.finetune.finetuning_type)
    if not is_main_process():
        resume = None if t.overwrite_output_dir else _resume_point(t.resume_from_checkpoint, _checkpoints(path), path)
        return RunDir(path, resume, RunStatus(id="", name=path.name))
    previous = read_status(path) if path.is_dir() else None
    if t.overwrite_output_dir and path.is_dir():
        for child in _checkpoints(path):
            shutil.rmtree(child)
        for name in RUN_FILES:
            (path / name).unlink(missing_ok=True)
        previous = None
    if previous and previous.state == "completed" and t.resume_from_checkpoint is None:
        raise UserError(f"output_dir {path} holds a completed run",
                        "choose another output_dir, or set overwrite_output_dir true to replace it")
    checkpoints = _checkpoints(path) if path.is_dir() else []
    resume_from = _resume_point(t.resume_from_checkpoint, checkpoints, path)
    if resume_from is None and previous is None and not t.overwrite_output_dir and path.is_dir() and any(path.iterdir()):
        raise UserError(f"output_dir {path} is not empty and holds no run of tuner's",
                        "choose an empty or new directory, or set overwrite_output_dir true")
    path.mkdir(parents=True, exist_ok=True)
    status = RunStatus(
        id=previous.id if previous else new_run_id(), name=t.run_name or path.name, pid=os.getpid(),
        output_dir=str(path.resolve()), model=cfg.model.model_name_or_path, method=_method_label(cfg),
    )
    if previous and resume_from:  # a resumed run shows where it stands until its first new log
        status.step, status.total_steps, status.loss = previous.step, previous.total_steps, previous.loss
    return RunDir(path, resume_from, status)


def _resume_point(asked: str | None, checkpoints: list[Path], path: Path) -> str | None:
    if asked is None or str(asked).lower() == "true":
        if asked is not None and not checkpoints:
            raise UserError(f"resume_from_checkpoint true, but {path} has no checkpoint-* directory to resume from")
        return str(checkpoints[-1]) if checkpoints else None
    if str(asked).lower() == "false":
        return None
    if not Path(asked).is_dir():
        raise UserError(f"resume_from_checkpoint {asked} is not a directory")
    return asked


def _method_label(cfg: TunerConfig) -> str:
    bits = cfg.model.quantization_bit
    return f"qlora-{bits}bit" if bits else cfg.finetune.finetuning_type


def setup_logging(run_dir: Path, console) -> None:
    """``train.log`` gets tuner's, transformers' and Python's warnings as plain lines (no progress-bar carriage
    returns); a Rich console, when given, shows the same lines above the progress bar."""
    import transformers

    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "train.log", encoding="utf-8")]
    if console is not None and not console.is_terminal:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(plain)
    if console is not None and console.is_terminal:
        from rich.logging import RichHandler

        handlers.append(RichHandler(console=console, show_path=False, markup=False, log_time_format="%H:%M:%S"))
    levels = {"tuner": logging.INFO, "transformers": logging.WARNING, "py.warnings": logging.WARNING}
    for name, level in levels.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = False
    transformers.logging.disable_default_handler()
    logging.captureWarnings(True)


QUEUE_POLL_S = 10.0


def wait_for_gpus(run: RunDir, poll_s: float | None = None) -> str | None:
    """Wait, state queued, while another run on this host holds one of this run's GPUs.

    Returns the signal's name when the user stopped the run while it waited.
    """
    from engine.jobs import gpu_holders, gpus_in_use

    run.status.gpus = gpus_in_use()
    stopped: list[str] = []
    previous = {sig: signal.signal(sig, lambda signum, _: stopped.append(signal.Signals(signum).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        announced = None
        while run.status.gpus and not stopped:
            holders = gpu_holders(run.status.gpus, run.status.id)
            if not holders:
                break
            if announced != holders[0].id:
                announced = holders[0].id
                log.info("queued: run %s holds this run's GPUs; starting when it ends (--force starts at once)",
                         announced)
                run.status.state = "queued"
                write_status(run.path, run.status)
            time.sleep(QUEUE_POLL_S if poll_s is None else poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    run.status.state = "running"
    write_status(run.path, run.status)
    return stopped[0] if stopped else None


def run_training(cfg: TunerConfig, foreground: bool = True, wait_for_free_gpus: bool = True) -> int:
    """Train as configured; returns the exit code. The run directory records the outcome whatever happens.

    In the foreground the log also goes to the terminal, with a progress line when it is a terminal. A run whose
    GPUs another run holds waits for them unless ``wait_for_free_gpus`` is False (`--force`).
    """
    from engine.catalog import resolve_model

    quiet_libraries()
    resolved = resolve_model(cfg.model.model_name_or_path)
    run = prepare_run_dir(cfg, cfg.model.model_name_or_path)
    if not is_main_process():
        _train(cfg, resolved, run, events=None, console=None)
        return 0
    register(run.path, run.status.id)
    console = _console() if foreground else None
    setup_logging(run.path, console)
    cfg.save(run.path / "config.yaml")
    write_status(run.path, run.status)
    events = EventWriter(run.path)
    try:
        stopped_by = wait_for_gpus(run) if wait_for_free_gpus else None
        if stopped_by:
            events.emit("end", state="stopped", step=0, signal=stopped_by)
        else:
            stopped_by = _train(cfg, resolved, run, events, console)
    except BaseException as exc:
        _record_failure(run, events, exc)
        raise
    finally:
        events.close()
    run.status.state = "stopped" if stopped_by else "completed"
    run.status.ended_at, run.status.exit_code = now_iso(), 0
    write_status(run.path, run.status)
    log.info("run %s %s: %s", run.status.id, run.status.state, run.path)
    if stopped_by:
        log.info("stopped at step %d with a checkpoint; the same command again resumes from it", run.status.step)
    return 0


def _record_failure(run: RunDir, events: EventWriter, exc: BaseException) -> None:
    interrupted = isinstance(exc, KeyboardInterrupt)
    message = "interrupted" if interrupted else str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    if not interrupted and not isinstance(exc, UserError):
        log.exception("training failed")
    else:
        log.error("training ended: %s", message)
    events.emit("error", message=message)
    events.emit("end", state="stopped" if interrupted else "failed")
    run.status.state = "stopped" if interrupted else "failed"
    run.status.error = None if interrupted else message
    run.status.ended_at, run.status.exit_code = now_iso(), 130 if interrupted else 1
    write_status(run.path, run.status)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _train(cfg: TunerConfig, resolved, run: RunDir, events: EventWriter | None, console) -> str | None:
    """The training itself; returns the signal name when a graceful stop ended it early.

    ``events`` is None in the other processes of a multi-GPU run: they train, rank 0 records.
    """
    import torch

    from engine.callbacks import ConsoleProgress, GracefulStop, RunEvents, gpu_memory_gib
    from engine.data.tokenize import build_datasets
    from engine.modeling import (Hardware, apply_method, choose_attention, choose_precision, count_parameters,
                                 load_model, load_tokenizer)

    hardware = Hardware.detect()
    precision = choose_precision(cfg.train.bf16, cfg.train.fp16, hardware.on_gpu, hardware.bf16_supported)
    attention, attention_reason = choose_attention(cfg.model.flash_attn, hardware.on_gpu, hardware.flash_attn_installed)
    log.info("precision: %s", precision.reason)
    log.info("attention: %s", attention_reason)

    model_path = resolved.path
    tokenizer = load_tokenizer(model_path, cfg)
    datasets = build_datasets(cfg, tokenizer, resolved.spec.template if resolved.spec else None)
    if events is not None and cfg.model.template != datasets.template:
        cfg.model.template = datasets.template  # config.yaml records the template the run resolved to
        cfg.save(run.path / "config.yaml")
    for line in datasets.report:
        log.info("data: %s", line)

    device_map = _device_map(cfg, hardware)
    model = load_model(model_path, cfg, precision, attention, device_map)
    model = apply_method(model, cfg, cfg.train.gradient_checkpointing)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    stop = GracefulStop()
    run_events = RunEvents(run.path, events, run.status) if events else None
    callbacks = [stop] + ([run_events] if run_events else [])
    if console is not None and console.is_terminal:
        callbacks.append(ConsoleProgress(console))
    trainer = _build_trainer(cfg, model, tokenizer, datasets, precision, hardware, run, callbacks)
    if events is None:
        stop.install()
        trainer.train(resume_from_checkpoint=run.resume_from)
        if not stop.requested:
            trainer.save_model(str(run.path))  # collective under FSDP / DeepSpeed: every rank takes part
        return stop.requested
    events.emit(
        "start", run_id=run.status.id, model=cfg.model.model_name_or_path, model_path=model_path,
        method=run.status.method, template=datasets.template, device=hardware.device_name,
        world_size=trainer.args.world_size, precision=precision.name, precision_reason=precision.reason,
        attention=attention, attention_reason=attention_reason, trainable_params=trainable, total_params=total,
        train_samples=len(datasets.train), eval_samples=len(datasets.eval) if datasets.eval else 0,
        resumed_from=run.resume_from, versions=_versions(),
        estimate=_estimate(cfg, model_path, trainer.args.world_size) if hardware.on_gpu else None,
    )
    if run.resume_from:
        log.info("resuming from %s", run.resume_from)
    stop.install()
    started = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=run.resume_from)
    except torch.OutOfMemoryError:
        raise UserError(_oom_message(cfg)) from None
    finally:
        stop.uninstall()
        run_events.close()
    if not stop.requested:
        trainer.save_model(str(run.path))
        tokenizer.save_pretrained(str(run.path))
        trainer.save_state()
    run.status.step = trainer.state.global_step
    memory = gpu_memory_gib()
    if memory:
        events.emit("memory", **memory)
    events.emit("end", state="stopped" if stop.requested else "completed", step=trainer.state.global_step,
                train_loss=result.training_loss, runtime_s=round(time.time() - started, 2),
                signal=stop.requested)
    return stop.requested


def _estimate(cfg: TunerConfig, model_path: str, world_size: int) -> dict | None:
    """The VRAM estimate for this run, recorded beside the measured peaks so each GPU run calibrates the estimator."""
    from engine.memory import estimate
    from engine.recommend import model_geometry, shape_from_config

    try:
        geometry = model_geometry(model_path)
    except (OSError, ValueError, UserError):
        return None
    result = estimate(shape_from_config(cfg, geometry, num_gpus=world_size))
    return {"peak_allocated_gib": result.peak_allocated_gib, "total_gib": result.total_gib}


def _device_map(cfg: TunerConfig, hardware) -> dict | None:
    """Quantized models must be placed on this process's GPU at load time; others are moved by the Trainer."""
    if cfg.model.quantization_bit is None or not hardware.on_gpu:
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def _build_trainer(cfg, model, tokenizer, datasets, precision, hardware, run: RunDir, callbacks):
    from transformers import PrinterCallback, Trainer
    from trl import SFTConfig, SFTTrainer

    try:
        args = _sft_config(SFTConfig, cfg, model, precision, hardware, run)
        Trainer.get_optimizer_cls_and_kwargs(args, model)  # an optimizer's missing package, now rather than at step 0
    except (ValueError, ImportError) as exc:  # what transformers refuses that engine.validation did not catch
        raise UserError(f"transformers refused the training arguments: {str(exc).splitlines()[0]}") from None
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=datasets.train, eval_dataset=datasets.eval,
        processing_class=tokenizer, callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def _sft_config(SFTConfig, cfg, model, precision, hardware, run: RunDir):
    """TRL's SFTConfig (TrainingArguments and SFT's own) from our config and the choices made at start."""
    t, d = cfg.train, cfg.data
    return SFTConfig(
        output_dir=str(run.path), per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps or t.warmup_ratio,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps, optim=t.optim, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy=t.eval_strategy, eval_steps=t.eval_steps or t.logging_steps,
        bf16=precision.name == "bf16", fp16=precision.name == "fp16", use_cpu=not hardware.on_gpu,
        **_checkpointing_args(SFTConfig, t.gradient_checkpointing), seed=t.seed, report_to=t.report_to,
        run_name=t.run_name, dataloader_num_workers=t.dataloader_num_workers, deepspeed=t.deepspeed,
        fsdp=t.fsdp or None, ddp_timeout=t.ddp_timeout, neftune_noise_alpha=cfg.finetune.neftune_noise_alpha,
        packing=d.packing, max_length=d.cutoff_len, dataset_num_proc=d.preprocessing_num_workers,
        disable_tqdm=True, include_num_input_tokens_seen="non_padding", use_liger_kernel=False,
        ddp_find_unused_parameters=_has_experts(model),
        save_only_model=False,
    )


def _has_experts(model) -> bool:
    """Mixture-of-experts layers may leave experts unused in a step, which DDP must be told to expect."""
    config = model.config
    return bool(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None))


def _checkpointing_args(config_class, enabled: bool) -> dict:
    """transformers renamed gradient_checkpointing to activation_checkpointing in 5.2x; speak whichever it knows."""
    import dataclasses

    name = ("activation_checkpointing" if "activation_checkpointing" in {f.name for f in dataclasses.fields(config_class)}
            else "gradient_checkpointing")
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def _oom_message(cfg: TunerConfig) -> str:
    import torch

    gib = 1024**3
    peak = torch.cuda.max_memory_allocated() / gib
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / gib
    return (f"out of GPU memory: the run needed more than the {total:.1f} GiB this GPU has "
            f"(peak allocated {peak:.1f} GiB before the failure); lower per_device_train_batch_size "
            f"({cfg.train.per_device_train_batch_size}) and raise gradient_accumulation_steps, lower cutoff_len "
            f"({cfg.data.cutoff_len}), keep gradient_checkpointing on, or use quantization_bit 4")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found
