"""Supervised fine-tuning: the config in, a run directory out (the contract in docs/design.md).

``run_training`` reads top-down in a run directory ``engine.runs.launch`` prepared: wait for the GPUs, load data and
model, build TRL's SFTTrainer with the callbacks that write the run's files, train, save, and record how it ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.errors import UserError, disk_full
from engine.quiet import quiet_libraries
from engine.runs.checkpoints import discard_incomplete, last_complete, newer_incomplete
from engine.runs.events import Event, EventWriter
from engine.runs.files import open_append, write_text_atomic
from engine.runs.gpu_queue import wait_for_gpus
from engine.runs.jobs import gpus_in_use
from engine.runs.rundir import RunDir, is_main_process
from engine.runs.status import now_iso, write_status
from engine.runs.stop import StopRequest
from engine.runs.layout import CONFIG, STATUS, TRAIN_LOG

log = logging.getLogger("tuner")

LOGGERS = {"tuner": logging.INFO, "transformers": logging.WARNING, "py.warnings": logging.WARNING}


def setup_logging(run_dir: Path, view=None) -> list[logging.Handler]:
    """``train.log`` gets tuner's, transformers' and Python's warnings as plain lines (no progress-bar carriage
    returns); a terminal ``view`` (engine.cli.train_view) shows the same lines. The previous run's handlers in this
    process are closed; the caller closes these with ``close_logging``."""
    import transformers

    plain = _formatter()
    handlers: list[logging.Handler] = [RunLogHandler(run_dir / TRAIN_LOG)]
    handlers[0].setFormatter(plain)
    if view is not None:
        handlers += view.log_handlers(plain)
    close_logging([h for name in LOGGERS for h in logging.getLogger(name).handlers])
    for name, level in LOGGERS.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = False
    transformers.logging.disable_default_handler()
    logging.captureWarnings(True)
    return handlers


def _formatter() -> logging.Formatter:
    """Plain lines; in a process of a multi-process run, tagged with its rank ("rank 1")."""
    from engine.runs.distributed import rank_tag

    tag = rank_tag()
    return logging.Formatter(f"%(asctime)s %(levelname)s {tag + ' ' if tag else ''}%(name)s: %(message)s",
                             "%Y-%m-%d %H:%M:%S")


def setup_rank_logging() -> list[logging.Handler]:
    """A process of a multi-process run other than rank 0: its warnings and errors, tagged with its rank, on stderr,
    which its supervisor copies into train.log."""
    import sys

    import transformers

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    transformers.logging.disable_default_handler()
    logging.captureWarnings(True)
    return [handler]


class RunLogHandler(logging.StreamHandler):
    """Appends to a run's train.log (never through a planted link) and closes it when the run is over."""

    def __init__(self, path: Path):
        super().__init__(open_append(path))

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass
        super().close()


def close_logging(handlers: list[logging.Handler]) -> None:
    """Detach a run's handlers from the loggers and close its train.log (a later run, or a prediction after
    training, in the same process logs through its own)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(handlers):
            if handler in logger.handlers:
                logger.removeHandler(handler)
    for handler in handlers:
        if isinstance(handler, RunLogHandler):
            handler.close()
    if handlers:
        logging.captureWarnings(False)


SNAPSHOT_POLL_S = 1.0  # how often a machine's other processes look for the snapshot its first process downloads


def run_training(cfg: TunerConfig, run: RunDir, stop: StopRequest | None, view=None,
                 wait_for_free_gpus: bool = True) -> int:
    """Train in ``run``'s directory (prepared and locked by ``engine.runs.launch``); returns the exit code: 0
    completed, 128 + the signal's number stopped. The directory records the outcome whatever happens: a failure is
    raised again, as one line (UserError) when it is the user's to fix."""
    quiet_libraries()
    if not is_main_process():
        stop = stop or StopRequest().install()
        resolved = _downloaded(cfg, run, None, stop)
        if resolved is not None:
            _train(cfg, resolved, run, None, None, stop)
        return 0
    stop = stop or StopRequest()
    handlers, events = [], None
    try:
        handlers = setup_logging(run.path, view)
        events = EventWriter(run.path)
        if wait_for_free_gpus and not stop.requested:
            wait_for_gpus(run, stop)
        elif not run.status.gpus:
            run.status.gpus = gpus_in_use()  # a forced run holds its GPUs too: later runs wait for it
        run.status.state = "running"
        write_status(run.path, run.status)
        ended = {}
        resolved = None if stop.requested and not _several_processes() else _downloaded(cfg, run, events, stop, view)
        if resolved is not None and (not stop.requested or _several_processes()):  # several: they stop together
            from engine.train.strategy import one_process_group

            with one_process_group(cfg.train.deepspeed, cfg.train.ddp_timeout):
                ended = _train(cfg, resolved, run, events, view, stop)
        events.emit(Event.END, state="stopped" if stop.requested else "completed", signal=stop.requested,
                    **{"step": run.status.step, **ended})
        run.status.state = "stopped" if stop.requested else "completed"
        run.status.ended_at, run.status.exit_code = now_iso(), stop.exit_code if stop.requested else 0
        write_status(run.path, run.status)
        log.info("run %s %s: %s", run.status.id, run.status.state, run.path)
        if stop.requested:
            log.info("stopped at step %d; `tuner resume %s` continues from its last checkpoint", run.status.step,
                     run.status.id)
        return run.status.exit_code
    except BaseException as exc:
        failure = _record_failure(run, events, exc, stop)
        if failure is None:
            return stop.exit_code
        if failure is exc:
            raise
        raise failure from None
    finally:
        _close_quietly(events)
        close_logging(handlers)


def _downloaded(cfg: TunerConfig, run: RunDir, events: EventWriter | None, stop: StopRequest, view=None):
    """The model resolved, a hub model downloaded first (by each machine's first process; rank 0 records its
    progress, the machine's other processes wait for the whole snapshot); None when a stop came during the download,
    whose fetched part stays for `tuner resume`."""
    from engine.models.download import DownloadStopped, download, human_bytes
    from engine.models.resolve import ResolvedModel, resolve_configured

    m = cfg.model
    resolved = resolve_configured(m)
    if resolved.plan is None:
        return resolved
    plan = resolved.plan
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        # every file, not config.json alone: an estimate or the wizard may have fetched just that
        while not all((plan.snapshot_dir / f.name).is_file() for f in plan.files):
            if stop.requested:
                return None
            time.sleep(SNAPSHOT_POLL_S)
        return ResolvedModel(str(plan.snapshot_dir), resolved.spec, "hub-cache")
    if events is not None:
        log.info("downloading %s (%s): %d files, %s, %s of it to fetch; %s free at %s", plan.hub_id, plan.revision,
                 len(plan.files), human_bytes(plan.total_bytes), human_bytes(plan.missing_bytes),
                 human_bytes(plan.free_bytes), plan.cache_dir)

    show, showing = view.download_display() if view is not None else (None, contextlib.nullcontext())

    def progress(p) -> None:
        events.emit(Event.DOWNLOAD, file=p.file, done=p.done_bytes, total=p.total_bytes, speed=p.speed_bytes_s,
                    eta_s=p.eta_s)
        if show is not None:
            show(p)

    started = time.monotonic()
    try:
        with showing:
            snapshot = download(plan, progress if events is not None else None, lambda: bool(stop.requested),
                                token=m.hf_hub_token)
    except DownloadStopped as stopped:
        if events is not None:
            log.info("download stopped at %s of %s; `tuner resume %s` continues it", human_bytes(stopped.done_bytes),
                     human_bytes(stopped.total_bytes), run.status.id)
        return None
    if events is not None:
        took = max(time.monotonic() - started, 1e-3)
        log.info("downloaded %s in %.0f s (%s/s): %s", plan.hub_id, took, human_bytes(plan.missing_bytes / took),
                 snapshot)
    return ResolvedModel(str(snapshot), resolved.spec, "hub-cache")


def _record_failure(run: RunDir, events: EventWriter | None, exc: BaseException,
                    stop: StopRequest) -> BaseException | None:
    """Write how the run ended (as far as the disk lets us); the error to raise, None when it was a stop."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    error: BaseException | None = exc
    if interrupted:
        message, error = "interrupted", None
    elif isinstance(exc, UserError):  # first: a download's disk-full line names the cache's disk, not the run's
        message = str(exc)
    elif disk_full(exc, run.path):
        removed = discard_incomplete(run.path)
        error = UserError(_disk_full_message(run, exc, removed))
        message = error.message
    elif isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else f" in {run.path}"
        error = UserError(f"cannot write{where}: {exc.strerror or exc}")
        message = error.message
    else:
        message = f"{type(exc).__name__}: {exc}"
    if error is exc and not isinstance(exc, UserError):
        log.exception("training failed")
    else:
        log.error("training ended: %s", message)
    if run.supervised and not interrupted:
        return error  # the supervisor records which rank ended the run, and why
    try:
        if events is not None:
            events.emit(Event.ERROR, message=message)
            events.emit(Event.END, state="stopped" if interrupted else "failed", step=run.status.step)
    except OSError:
        pass
    run.status.state = "stopped" if interrupted else "failed"
    run.status.error = None if interrupted else message
    run.status.ended_at = now_iso()
    run.status.exit_code = stop.exit_code if interrupted else 2 if isinstance(error, UserError) else 1
    try:
        write_status(run.path, run.status)
    except OSError as write_error:
        log.error("could not record the failure in %s: %s", run.path / STATUS, write_error.strerror)
    return error


def _disk_full_message(run: RunDir, exc: BaseException, removed: list[Path]) -> str:
    free = shutil.disk_usage(run.path).free / 1024**2
    good = last_complete(run.path)
    kept = f"; {good.name} is whole, and `tuner resume {run.status.id}` continues from it" if good else ""
    cut = f"; the unfinished {', '.join(p.name for p in removed)} was removed" if removed else ""
    return (f"disk full: no space left on the device that holds {run.path} ({free:.0f} MiB free now){cut}; free "
            f"some space or lower save_total_limit{kept}")


def _close_quietly(events: EventWriter | None) -> None:
    try:
        if events is not None:
            events.close()
    except OSError:
        pass


def _train(cfg: TunerConfig, resolved, run: RunDir, events: EventWriter | None, view, stop: StopRequest) -> dict:
    """The training itself; returns what the end event records ({} when a stop came before the first step).

    ``events`` is None in the other processes of a multi-GPU run: they train, rank 0 records. A stop is honoured
    between the slow phases too, so a run stopped while it loads ends "stopped" at once.
    """
    import torch

    from engine.train.callbacks import Divergence, GracefulStop, RunEvents, gpu_memory_gib
    from engine.data.tokenize import build_datasets
    from engine.models.loading import (Hardware, apply_method, check_requests, choose_precision, count_parameters,
                                       load_model, load_tokenizer)

    hardware = Hardware.detect()
    check_requests(cfg, hardware)
    precision = choose_precision(cfg.train.bf16, cfg.train.fp16, hardware.on_gpu, hardware.bf16_supported,
                                 cfg.train.pure_bf16)
    log.info("precision: %s", precision.reason)

    model_path = resolved.path
    tokenizer = load_tokenizer(model_path, cfg)
    from engine.data.tokenize import PreparationStopped

    try:  # stoppable only in a run of one process: several stop together, at their first step
        datasets = build_datasets(cfg, tokenizer, resolved.spec.template if resolved.spec else None,
                                  None if _several_processes() else stop.wait)
    except PreparationStopped:
        log.info("stopped while the data was being prepared: nothing of it was kept")
        return {}
    if events is not None and cfg.model.template != datasets.template:
        cfg.model.template = datasets.template  # config.yaml records the template the run resolved to
        write_text_atomic(run.path / CONFIG, cfg.to_yaml())
    for line in datasets.report:
        log.info("data: %s", line)
    if datasets.saved_to is not None:
        log.info("tokenized dataset saved to %s; start again with tokenized_path %s to train on it",
                 datasets.saved_to, datasets.saved_to)
        return {"tokenized_path": str(datasets.saved_to)}
    if stop.requested and not _several_processes():  # several: step 1 stops them all together
        return {}

    plan = _plan_speed(cfg, hardware, model_path, datasets, run)
    for line in plan.lines():
        log.info("speed: %s", line)
    strategy = _strategy(cfg, run, model_path, precision, plan)
    device_map = _device_map(cfg, hardware)
    from transformers import set_seed

    set_seed(cfg.train.seed)  # LoRA's initial weights too: the same seed trains the same run
    strategy.before_model_load(plan.fit.micro_batch, plan.fit.accumulation)  # the strategy keeps what must live
    model = load_model(model_path, cfg, precision, plan.attention, device_map)
    if plan.liger.on:
        from engine.models.kernels import apply_liger

        apply_liger(model)
    model = apply_method(model, cfg, strategy.checkpointing(plan.fit.gradient_checkpointing))
    if events is not None and cfg.finetune.pissa_convert:
        _save_pissa_init(model, run)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    if stop.requested and not _several_processes():  # several: step 1 stops them all together
        return {}

    divergence = Divergence(grad_norm_may_overflow=precision.name == "fp16")
    run_events = RunEvents(run.path, events, run.status) if events else None
    callbacks = [GracefulStop(stop), divergence] + ([run_events] if run_events else [])
    if view is not None:
        callbacks += view.callbacks()
    try:
        trainer = _build_trainer(cfg, model, tokenizer, datasets, precision, hardware, run, callbacks, divergence,
                                 plan, strategy)
    except BaseException:
        if run_events:
            run_events.close()
        raise
    if events is None:
        result = trainer.train(resume_from_checkpoint=run.resume_from)
        _after_training(cfg, trainer, result, model, tokenizer, run, divergence, stop, main=False)
        return {}
    start = dict(
        run_id=run.status.id, model=cfg.model.model_name_or_path, model_path=model_path,
        method=run.status.method, template=datasets.template, device=hardware.device_name,
        world_size=trainer.args.world_size, precision=precision.name, precision_reason=precision.reason,
        attention=plan.attention, attention_reason=plan.attention_why, trainable_params=trainable, total_params=total,
        train_samples=len(datasets.train), eval_samples=len(datasets.eval) if datasets.eval else 0,
        resumed_from=run.resume_from, versions=_versions(),
    )
    events.emit(Event.START, **start, speed=plan.features(), batch=_batch(trainer.args, plan),
                estimate=_estimate(cfg, model_path, trainer.args.world_size) if hardware.on_gpu else None)
    if run.resume_from:
        own = Path(run.resume_from).parent == run.path
        for skipped in newer_incomplete(run.path, Path(run.resume_from)) if own else []:
            log.warning("%s is not whole (a save cut short, or a file of it cut or damaged since): resuming from %s "
                        "instead", skipped, Path(run.resume_from).name)
        log.info("resuming from %s", run.resume_from)
        if cfg.passthrough.get("save_only_model"):
            log.warning("save_only_model: the checkpoint holds the weights only, so the optimizer's state and the "
                        "learning-rate schedule start afresh")
    started = time.time()
    try:
        while True:
            smaller = None
            try:
                result = trainer.train(resume_from_checkpoint=run.resume_from)
                break
            except torch.OutOfMemoryError:
                smaller = _backoff(plan, trainer)
                if smaller is None:
                    raise UserError(_oom_message(cfg, plan)) from None
            # out of the except block, so the failed attempt's frames (and the activations they hold) are gone
            log.warning("out of GPU memory in the first step with %s: going on with %s", plan.fit.describe(),
                        smaller.fit.describe())
            _release(trainer, model, smaller)
            plan = smaller
            trainer = _build_trainer(cfg, model, tokenizer, datasets, precision, hardware, run, callbacks,
                                     divergence, plan, strategy)
            events.emit(Event.START, **start, speed=plan.features(), batch=_batch(trainer.args, plan),
                        backed_off=True)
    except BaseException:
        run_events.close()
        raise
    try:
        digests = _after_training(cfg, trainer, result, model, tokenizer, run, divergence, stop, main=True)
    finally:
        run_events.close()  # after the final evaluation, whose eval event and trainer_log line it writes
    memory = gpu_memory_gib()
    if memory:
        events.emit(Event.MEMORY, **memory)
    return {"step": trainer.state.global_step, "train_loss": result.training_loss,
            "runtime_s": round(time.time() - started, 2), **({"weight_digests": digests} if digests else {})}


def _after_training(cfg: TunerConfig, trainer, result, model, tokenizer, run: RunDir, divergence, stop: StopRequest,
                    main: bool) -> list[str]:
    """Once training ended, in every process: agree on a stop, compare the processes' weights, refuse a diverged
    run, and save what it trained with LLaMA-Factory's results files (and ``do_eval``'s evaluation). Returns the
    weight digests (several processes)."""
    run.status.step = trainer.state.global_step
    _agree_on_stop(stop)
    digests = _weight_digests(cfg, model, trainer)
    if digests and len(set(digests)) > 1:
        log.warning("the processes' trained weights differ after step %d (digests %s): the run was not one "
                    "synchronised training", trainer.state.global_step, ", ".join(digests))
    if divergence.found and main:
        raise UserError(divergence.message(cfg, last_complete(run.path)))
    if divergence.found or stop.requested:
        return digests
    trainer.save_model(str(run.path))  # collective under FSDP / DeepSpeed: every process takes part
    if main:
        tokenizer.save_pretrained(str(run.path))
        trainer.save_state()
        if cfg.finetune.pissa_convert:
            _save_pissa_converted(model, run)
    _save_results(cfg, trainer, result, run, main)
    if main and cfg.train.plot_loss:
        from engine.train.plots import plot_loss

        plot_loss(run.path)
    return digests


def _save_results(cfg: TunerConfig, trainer, result, run: RunDir, main: bool) -> None:
    """LLaMA-Factory's train_results.json and, with ``do_eval``, one evaluation on the eval data (a collective: every
    process takes part; its ``eval`` event is logged as any evaluation's) and eval_results.json with perplexity."""
    from engine.train.results import save_results, with_perplexity

    if main:
        save_results(run.path, "train", result.metrics)
    if cfg.train.do_eval and trainer.eval_dataset is None:  # every sample of it dropped in tokenization
        if main:
            log.warning("do_eval: no evaluation sample is left after tokenization, so there is no evaluation to run")
    elif cfg.train.do_eval:
        metrics = with_perplexity(trainer.evaluate(metric_key_prefix="eval"))
        if main:
            save_results(run.path, "eval", metrics)


def _several_processes() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _agree_on_stop(stop: StopRequest) -> None:
    """After training, every process takes the same path (save or not: a collective under ZeRO-3 and FSDP): a stop
    any of them got by now is every one's (a collective itself, so each process calls it once, at this point)."""
    if not _several_processes():
        return
    from engine.train.callbacks import any_process

    if any_process(bool(stop.requested)) and not stop.requested:
        stop.requested = "a stop asked of another process"


def _weight_digests(cfg: TunerConfig, model, trainer) -> list[str] | None:
    """Under DDP, a digest of each process's trainable weights, gathered on every rank (a collective): equal when
    the processes trained as one. None with one process, or when the weights are sharded (FSDP, DeepSpeed)."""
    if trainer.args.world_size < 2 or cfg.train.strategy != "ddp" or cfg.train.deepspeed or cfg.train.fsdp:
        return None
    import hashlib

    import torch
    import torch.distributed as dist

    sums = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
            for _, p in sorted(model.named_parameters()) if p.requires_grad]
    digest = hashlib.sha256(torch.stack(sums).cpu().numpy().tobytes()).hexdigest()[:16] if sums else ""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return gathered


PISSA_INIT, PISSA_CONVERTED = "pissa_init", "pissa_converted"


def _save_pissa_init(model, run: RunDir) -> None:
    """The PiSSA adapter before training, which pissa_convert subtracts at the end (LLaMA-Factory's layout). A resumed
    run keeps the one its first start wrote."""
    target = run.path / PISSA_INIT
    if (target / "adapter_config.json").is_file():
        return
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # reloads as a plain adapter, no second SVD
    try:
        model.save_pretrained(str(target))
    finally:
        config.init_lora_weights = init


def _save_pissa_converted(model, run: RunDir) -> None:
    """The trained PiSSA adapter as a plain LoRA one (rank doubled) that applies to the original base model."""
    target = run.path / PISSA_CONVERTED
    model.save_pretrained(str(target), path_initial_model_for_weight_conversion=str(run.path / PISSA_INIT))
    log.info("PiSSA adapter converted to a plain LoRA adapter for the original base: %s", target)


def _plan_speed(cfg: TunerConfig, hardware, model_path: str, datasets, run: RunDir):
    """Padding-free batches, attention, Liger and the batch layout for this run (engine.train.speed). A resumed
    run keeps the layout it trained with, so its steps, schedule and position in the data stay the same."""
    import psutil
    import torch

    from engine.memory.recommend import model_geometry, shape_from_config
    from engine.models.attention import torch_varlen_available
    from engine.models.kernels import liger_model_types
    from engine.train.speed import Machine, plan_speed

    free_gib = None
    if hardware.on_gpu:
        free_gib = _memory_for_fit(torch)
    machine = Machine(on_gpu=hardware.on_gpu, flash_attn_installed=hardware.flash_attn_installed,
                      torch_varlen=torch_varlen_available(),
                      liger_model_types=liger_model_types() if hardware.on_gpu else None, free_gib=free_gib,
                      available_ram_gib=psutil.virtual_memory().available / 1024**3)
    try:
        geometry = model_geometry(model_path)
        shape = shape_from_config(cfg, geometry, num_gpus=int(os.environ.get("WORLD_SIZE", "1")))
    except (OSError, ValueError, KeyError, UserError):
        shape = None
    plan = plan_speed(cfg, machine, datasets.lengths, _model_traits(model_path, cfg), shape)
    if run.resume_from and cfg.train.auto_fit:
        from dataclasses import replace

        from engine.memory.autofit import user_fit

        t = cfg.train
        earlier = _layout_trained_with(run) or user_fit(
            t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing,
            "resumed from a checkpoint whose layout is not recorded: the batch as given, so the steps line up")
        plan = replace(plan, fit=earlier)
    return plan


def _layout_trained_with(run: RunDir):
    """The batch layout of this run's last start event, when it resumes its own checkpoint."""
    from engine.memory.autofit import Fit
    from engine.runs.events import newest_events

    if Path(run.resume_from).parent != run.path:
        return None
    batch = next((e["batch"] for e in newest_events(run.path, types=("start",), max_bytes=None)
                  if isinstance(e.get("batch"), dict)), None)
    if batch is None:
        return None
    try:
        return Fit(int(batch["per_device_train_batch_size"]), int(batch["gradient_accumulation_steps"]),
                   bool(batch["gradient_checkpointing"]),
                   int(batch["packed_tokens"]) if batch.get("packed_tokens") else None,
                   reason="resumed: the layout this run trained with, so its steps and schedule stay the same")
    except (KeyError, TypeError, ValueError):
        return None


def _memory_for_fit(torch) -> float:
    """This GPU's free memory. Under several processes every rank must pick the same layout (the ranks of a step
    agree on its micro-batches), and free memory differs from rank to rank and moment to moment: there the GPU's
    total memory counts, which identical cards share (other processes' use is then not seen)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.cuda.get_device_properties(local_rank).total_memory / 1024**3
    return torch.cuda.mem_get_info(local_rank)[0] / 1024**3


def _model_traits(model_path: str, cfg: TunerConfig):
    """The model's type, whether transformers dispatches its attention (and packed masks) through AttentionInterface,
    and what would keep VARLEN from serving it, from its config.json."""
    import json

    import transformers

    from engine.models.attention import varlen_blocker
    from engine.train.speed import ModelTraits

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return ModelTraits(None, attention_backend=False)
    classes = [getattr(transformers, name, None) for name in config.get("architectures") or []]
    backend = bool(classes) and all(getattr(c, "_supports_attention_backend", False) for c in classes)
    return ModelTraits(config.get("model_type"), backend, varlen_blocker(config, cfg.data.cutoff_len))


def _batch(args, plan) -> dict:
    """The batch layout the trainer runs with, for the start event."""
    return {"per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "packed_tokens": plan.packed_tokens, "gradient_checkpointing": plan.fit.gradient_checkpointing}


BACKOFF_BEFORE_STEP = 1  # an out-of-memory error before this optimizer step backs off; later ones end the run


def _backoff(plan, trainer):
    """The plan with a smaller layout after an out-of-memory error in the first step, or None (auto_fit off, a
    later step, several processes, nothing smaller left)."""
    from dataclasses import replace

    from engine.memory.autofit import backoff

    if not plan.auto_fit or trainer.state.global_step >= BACKOFF_BEFORE_STEP or trainer.args.world_size > 1:
        return None  # under several processes one rank cannot start over alone: the run fails with the message
    smaller = backoff(plan.fit, plan.longest_sample)
    return replace(plan, fit=smaller) if smaller else None


def _release(trainer, model, smaller) -> None:
    """Free what the failed attempt held on the GPU, and ready the model for checkpointing if the next one uses it."""
    import gc

    import torch

    hook = getattr(trainer, "neftune_hook_handle", None)
    if hook is not None:
        hook.remove()  # the Trainer removes NEFTune's hook only when train() returns; the next attempt adds its own
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    if smaller.fit.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _estimate(cfg: TunerConfig, model_path: str, world_size: int) -> dict | None:
    """The VRAM estimate for this run, recorded beside the measured peaks so each GPU run calibrates the estimator."""
    from engine.memory.estimate import estimate
    from engine.memory.recommend import model_geometry, shape_from_config

    try:
        geometry = model_geometry(model_path)
    except (OSError, ValueError, UserError):
        return None
    result = estimate(shape_from_config(cfg, geometry, num_gpus=world_size))
    return {"peak_allocated_gib": result.peak_allocated_gib, "total_gib": result.total_gib}


def _device_map(cfg: TunerConfig, hardware) -> dict | None:
    """Quantized models must be placed on this process's GPU at load time; others are moved by the Trainer, and a
    sharding strategy (FSDP, ZeRO-3) places the shards itself."""
    from engine.memory.recommend import sharding_of

    if cfg.model.quantization_bit is None or not hardware.on_gpu or sharding_of(cfg) == "zero3":
        return None  # zero3: the strategy's fsdp* / zero3*, or the user's own ZeRO-3 file or FSDP full shard
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def _strategy(cfg: TunerConfig, run: RunDir, model_path: str, precision, plan):
    """The run's strategy (engine.train.strategy), its DeepSpeed / accelerate files written in every process (the
    machines of a run need not share a disk)."""
    from engine.train.strategy import World, prepare_strategy

    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_WORLD_SIZE", size))
    port = env.get("MASTER_PORT")
    world = World(size, max(1, size // max(local, 1)), int(env.get("GROUP_RANK", "0")),
                  env.get("MASTER_ADDR", "127.0.0.1"), int(port) if port and port.isdigit() else None)
    strategy = prepare_strategy(cfg, run.path, model_path, precision.name, world, plan.fit.gradient_checkpointing)
    if cfg.train.strategy != "ddp":
        log.info("%s", strategy.describe())
    return strategy


def _build_trainer(cfg, model, tokenizer, datasets, precision, hardware, run: RunDir, callbacks, divergence, plan,
                   strategy):
    from transformers import PrinterCallback, Trainer
    from trl import SFTConfig

    from engine.train.loss import trainer_class

    try:
        args = _sft_config(SFTConfig, cfg, model, precision, hardware, run, plan, strategy)
        Trainer.get_optimizer_cls_and_kwargs(args, model)  # an optimizer's missing package, now rather than at step 0
    except (ValueError, ImportError) as exc:  # what transformers refuses that engine.config.validation did not catch
        raise UserError(f"transformers refused the training arguments: {str(exc).splitlines()[0]}") from None
    try:
        trainer = divergence.watching(trainer_class(plan.loss))(
            model=model, args=args, train_dataset=_training_rows(datasets.train, cfg, plan),
            eval_dataset=datasets.eval, processing_class=tokenizer, callbacks=callbacks,
            optimizers=_optimizers(cfg, model, args, Trainer),
        )
    except ValueError as exc:  # the Trainer's own checks of the settings together (fields passed through included)
        raise UserError(f"the trainer refused the settings: {str(exc).strip().splitlines()[0]}") from None
    trainer.remove_callback(PrinterCallback)
    return trainer


def _optimizers(cfg: TunerConfig, model, args, Trainer) -> tuple:
    """(optimizer, scheduler) for the Trainer: LoRA+ (PEFT's create_loraplus_optimizer, the lora_B matrices at
    learning_rate x loraplus_lr_ratio) with the optim asked for; else (None, None), the Trainer's own."""
    ratio = cfg.finetune.loraplus_lr_ratio
    if not ratio or cfg.finetune.finetuning_type != "lora":
        return None, None
    from peft.optimizers import create_loraplus_optimizer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    optimizer = create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                          loraplus_lr_embedding=cfg.finetune.loraplus_lr_embedding,
                                          loraplus_weight_decay=args.weight_decay, **kwargs)
    log.info("LoRA+: lora_B matrices learn at %g (learning_rate %g x loraplus_lr_ratio %g), %s", args.learning_rate
             * ratio, args.learning_rate, ratio, optimizer_cls.__name__)
    return optimizer, None


def _training_rows(train, cfg: TunerConfig, plan):
    """The training set as the trainer takes it: packed into rows of up to T tokens (auto-fit's layout, or
    cutoff_len with ``packing``) by TRL's best-fit-decreasing packing, each sample whole and kept apart by the
    padding-free collator; else one sample a row. Evaluation data is never packed, nor cut again."""
    tokens = plan.packed_tokens or (cfg.data.cutoff_len if cfg.data.packing else None)
    if tokens is None:
        return train
    from trl import pack_dataset

    return pack_dataset(train, tokens, strategy="bfd", map_kwargs={"keep_in_memory": True})  # not into the cache


def _sft_config(SFTConfig, cfg, model, precision, hardware, run: RunDir, plan, strategy):
    """TRL's SFTConfig (TrainingArguments and SFT's own) from our config and the choices made at start; the
    strategy's FSDP or DeepSpeed settings, else the user's own deepspeed / fsdp keys."""
    t, d, fit = cfg.train, cfg.data, plan.fit
    sharding = strategy.training_kwargs(fit.gradient_checkpointing) or {"deepspeed": t.deepspeed, "fsdp": t.fsdp or None}
    chosen = dict(
        output_dir=str(run.path), per_device_train_batch_size=fit.micro_batch,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=fit.accumulation, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps or t.warmup_ratio,
        num_train_epochs=t.num_train_epochs, max_steps=t.max_steps, optim=t.optim, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, eval_strategy=t.eval_strategy, eval_steps=t.eval_steps or t.logging_steps,
        bf16=precision.name == "bf16", fp16=precision.name == "fp16", use_cpu=not hardware.on_gpu,
        **_checkpointing_args(SFTConfig, strategy.checkpointing(fit.gradient_checkpointing)), seed=t.seed,
        report_to=t.report_to, run_name=t.run_name, dataloader_num_workers=t.dataloader_num_workers, **sharding,
        ddp_timeout=t.ddp_timeout, neftune_noise_alpha=cfg.finetune.neftune_noise_alpha,
        packing=False, padding_free=plan.padding_free, max_length=None if plan.padding_free else d.cutoff_len,
        dataset_num_proc=d.preprocessing_num_workers,
        dataset_kwargs={"skip_prepare_dataset": True},  # tokenized, cut and packed by the engine already
        disable_tqdm=True, include_num_input_tokens_seen="non_padding", use_liger_kernel=False,
        ddp_find_unused_parameters=_has_experts(model),
    )
    return SFTConfig(**_with_passthrough(chosen, cfg, model))


CHECKPOINTING_KWARGS = ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")


def _with_passthrough(chosen: dict, cfg: TunerConfig, model) -> dict:
    """``chosen`` overlaid with the TrainingArguments / SFTConfig fields the user gave that are not tuner's own.

    The user's checkpointing keywords replace the engine's under the name this transformers reads (it ignores the old
    name when the new one is set); the router loss of LLaMA-Factory's moe_aux_loss_coef applies to mixture-of-experts
    models only, as there.
    """
    fields = dict(cfg.passthrough)
    engine_name = next(name for name in CHECKPOINTING_KWARGS if name in chosen)
    for name in CHECKPOINTING_KWARGS:
        if name in fields:
            chosen[engine_name] = fields.pop(name)
    if "router_aux_loss_coef" in fields and not _has_experts(model):
        fields.pop("router_aux_loss_coef")
        log.warning("router_aux_loss_coef (moe_aux_loss_coef) left out: %s is not a mixture-of-experts model",
                    cfg.model.model_name_or_path)
    return {**chosen, **fields}


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


def _oom_message(cfg: TunerConfig, plan) -> str:
    import torch

    gib = 1024**3
    figures = " memory than the GPU has"
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / gib
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / gib
        figures = f" than the {total:.1f} GiB this GPU has (peak allocated {peak:.1f} GiB before the failure)"
    return (f"out of GPU memory: the run needed more{figures} with {plan.fit.describe()}; lower per_device_train_batch_size "
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
