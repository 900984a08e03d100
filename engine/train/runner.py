"""The shared runner: a stage (engine.train.sft, ...) trained in a run directory, the config in, the directory out
(the contract in docs/design.md).

``run_training`` reads top-down in a directory that ``engine.runs.launch`` prepared and locked: take the run's turn
on its GPUs (handed in by whoever started it), resolve and download the model, prepare the stage's data, plan the
speed and strategy, load the model and apply the method, build the stage's trainer with the callbacks that write
the run's files, train (backing off to a smaller layout after an out-of-memory first step), save, and record how it
ended, a failure and a full disk included. Training imports nothing of the orchestration above it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.errors import UserError, disk_full
from engine.quiet import quiet_libraries
from engine.rundir.checkpoints import discard_incomplete, last_complete, newer_incomplete
from engine.rundir.events import Event, EventWriter
from engine.rundir.files import write_text_atomic
from engine.rundir.layout import CONFIG, STATUS
from engine.rundir.run import RunDir
from engine.rundir.status import now_iso, write_status
from engine.train.logs import close_logging, setup_logging
from engine.train.stage import Stage, StopAsked, TrainerParts
from engine.world import is_main_process, local_rank, several_processes

log = logging.getLogger("tuner")


def stage_of(cfg: TunerConfig) -> Stage:
    """The stage the config's ``stage`` names (the config refuses the names of stages tuner does not run)."""
    if cfg.finetune.stage == "sft":
        from engine.train.sft import SFT

        return SFT
    if cfg.finetune.stage == "dpo":
        from engine.train.dpo import DPO

        return DPO
    if cfg.finetune.stage == "kto":
        from engine.train.kto import KTO

        return KTO
    if cfg.finetune.stage == "rm":
        from engine.train.rm import RM

        return RM
    if cfg.finetune.stage == "pt":
        from engine.train.pt import PT

        return PT
    raise UserError(f"stage {cfg.finetune.stage} is not one tuner runs", "use stage sft, dpo, kto, rm or pt")


SNAPSHOT_POLL_S = 1.0  # how often a machine's other processes look for the snapshot its first process downloads


def run_training(cfg: TunerConfig, run: RunDir, stop: StopAsked, view=None,
                 gpu_turn: Callable[[RunDir, StopAsked], None] | None = None) -> int:
    """Train in ``run``'s directory (prepared and locked by ``engine.runs.launch``); returns the exit code: 0
    completed, 128 + the signal's number stopped. The directory records the outcome whatever happens: a failure is
    raised again, as one line (UserError) when it is the user's to fix.

    Handed in by whoever started the run: ``stop``, the graceful stop it honours (its signal handlers installed);
    ``gpu_turn``, the run's turn on its GPUs (engine.runs.gpu_queue), taken once train.log is open so its "queued"
    line lands there; None when the caller took it (a supervisor of several processes) or none is needed."""
    quiet_libraries()
    if not is_main_process():
        resolved = _downloaded(cfg, run, None, stop)
        if resolved is not None:
            _train(cfg, resolved, run, None, None, stop)
        return 0
    handlers, events = [], None
    try:
        handlers = setup_logging(run.path, view)
        events = EventWriter(run.path)
        if gpu_turn is not None:
            gpu_turn(run, stop)
        run.status.state = "running"
        write_status(run.path, run.status)
        ended = {}
        resolved = None if stop.requested and not several_processes() else _downloaded(cfg, run, events, stop, view)
        if resolved is not None and (not stop.requested or several_processes()):  # several: they stop together
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


def _downloaded(cfg: TunerConfig, run: RunDir, events: EventWriter | None, stop: StopAsked, view=None):
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
    if local_rank() != 0:
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
                    stop: StopAsked) -> BaseException | None:
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


def _train(cfg: TunerConfig, resolved, run: RunDir, events: EventWriter | None, view, stop: StopAsked) -> dict:
    """The training itself; returns what the end event records ({} when a stop came before the first step).

    ``events`` is None in the other processes of a multi-GPU run: they train, rank 0 records. A stop is honoured
    between the slow phases too, so a run stopped while it loads ends "stopped" at once.
    """
    from engine.data.tokenize import PreparationStopped
    from engine.models.loading import (Hardware, apply_method, check_requests, choose_precision, count_parameters,
                                       load_model, load_tokenizer)
    from engine.train.callbacks import Divergence, GracefulStop, RunEvents, gpu_memory_gib
    from engine.train.setup import device_map, speed_plan, strategy_for

    stage = stage_of(cfg)

    hardware = Hardware.detect()
    check_requests(cfg, hardware)
    if events is not None:
        from engine.config.library import library_fields

        library_fields()  # transformers and TRL are loaded now anyway: their fields kept for `--help` and the wizard
    precision = choose_precision(cfg.train.bf16, cfg.train.fp16, hardware.on_gpu, hardware.bf16_supported,
                                 cfg.train.pure_bf16)
    log.info("precision: %s", precision.reason)

    model_path = resolved.path
    tokenizer = load_tokenizer(model_path, cfg)
    try:  # stoppable only in a run of one process: several stop together, at their first step
        datasets = stage.datasets(cfg, tokenizer, resolved.spec.template if resolved.spec else None,
                                  None if several_processes() else stop.wait)
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
    if stop.requested and not several_processes():  # several: step 1 stops them all together
        return {}

    plan = speed_plan(cfg, hardware, model_path, datasets, run, pairs=stage.pairs)
    for line in plan.lines():
        log.info("speed: %s", line)
    strategy = strategy_for(cfg, run, model_path, precision, plan)
    from transformers import set_seed

    set_seed(cfg.train.seed)  # LoRA's initial weights too: the same seed trains the same run
    strategy.before_model_load(plan.fit.micro_batch, plan.fit.accumulation)  # the strategy keeps what must live
    model = load_model(model_path, cfg, precision, plan.attention, device_map(cfg, hardware), reward=stage.reward)
    if plan.liger.on:
        from engine.models.kernels import apply_liger

        apply_liger(model)
    model = apply_method(model, cfg, strategy.checkpointing(plan.fit.gradient_checkpointing))
    if events is not None and cfg.finetune.pissa_convert:
        from engine.train import pissa

        pissa.save_init(model, run)
    trainable, total = count_parameters(model)
    log.info("trainable parameters: %s of %s (%.4f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    if stop.requested and not several_processes():  # several: step 1 stops them all together
        return {}

    divergence = Divergence(grad_norm_may_overflow=precision.name == "fp16")
    run_events = RunEvents(run.path, events, run.status) if events else None
    callbacks = [GracefulStop(stop), divergence] + ([run_events] if run_events else [])
    if view is not None:
        callbacks += view.callbacks()
    parts = TrainerParts(cfg, model, tokenizer, datasets, precision, hardware, run, callbacks, divergence, strategy,
                         model_path)
    try:
        trainer = stage.trainer(parts, plan)
        plan, trainer = _check_fast_path(stage, parts, plan, trainer)
    except BaseException:
        if run_events:
            run_events.close()
        raise
    if events is None:
        result = trainer.train(resume_from_checkpoint=run.resume_from)
        _after_training(cfg, stage, trainer, result, model, tokenizer, run, divergence, stop, main=False)
        return {}
    start = dict(
        run_id=run.status.id, model=cfg.model.model_name_or_path, model_path=model_path,
        method=run.status.method, template=datasets.template, device=hardware.device_name,
        world_size=trainer.args.world_size, precision=precision.name, precision_reason=precision.reason,
        attention=plan.attention, attention_reason=plan.attention_why, trainable_params=trainable, total_params=total,
        train_samples=len(datasets.train), eval_samples=len(datasets.eval) if datasets.eval else 0,
        resumed_from=run.resume_from, versions=_versions(),
    )
    from engine.train.setup import estimate_for

    events.emit(Event.START, **start, speed=plan.features(), batch=_batch(trainer.args, plan),
                estimate=estimate_for(cfg, model_path, trainer.args.world_size) if hardware.on_gpu else None)
    _say_where_it_resumes(cfg, run)
    started = time.time()
    try:
        trainer, result = _train_backing_off(stage, parts, plan, trainer, events, start)
    except BaseException:
        run_events.close()
        raise
    try:
        digests = _after_training(cfg, stage, trainer, result, model, tokenizer, run, divergence, stop, main=True)
    finally:
        run_events.close()  # after the final evaluation, whose eval event and trainer_log line it writes
    memory = gpu_memory_gib()
    if memory:
        events.emit(Event.MEMORY, **memory)
    return {"step": trainer.state.global_step, "train_loss": result.training_loss,
            "runtime_s": round(time.time() - started, 2), **({"weight_digests": digests} if digests else {})}


def _check_fast_path(stage: Stage, parts: TrainerParts, plan, trainer):
    """The start-of-run check of the plan's fast path (engine.train.path_check); after a failed one, the classic
    plan and its trainer. Returns the plan (with the check's result) and the trainer to train with."""
    from dataclasses import replace

    from engine.train import path_check

    why = path_check.why_not(parts.cfg, plan, parts.hardware.on_gpu, stage.pairs, trainer.args.world_size)
    if why is not None:
        left_out = path_check.PathCheck(False, why)
        asked = parts.cfg.train.check_fast_path and why != "check_fast_path false"
        log.log(logging.WARNING if asked else logging.INFO, "%s", left_out.line())  # asked for: said louder
        return replace(plan, check=left_out), trainer
    pad = parts.tokenizer.pad_token_id
    result = path_check.check(trainer, parts.model, plan, parts.precision.name, 0 if pad is None else pad)
    _free_gpu_memory()
    if not result.fell_back:
        log.info("%s", result.line())
        return replace(plan, check=result), trainer
    log.warning("%s", result.line())
    classic = path_check.classic_plan(plan, parts.cfg, result)
    path_check.set_attention(parts.model, "sdpa")  # the classic path from here on
    if classic.fit.gradient_checkpointing and hasattr(parts.model, "enable_input_require_grads"):
        parts.model.enable_input_require_grads()
    return classic, stage.trainer(parts, classic)


def _free_gpu_memory() -> None:
    """What is no longer referenced freed and the peak forgotten (after the start check, after a failed attempt):
    the peak a run records is its training's."""
    import gc

    import torch

    from engine.train.callbacks import reset_peak_memory

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reset_peak_memory()


def _say_where_it_resumes(cfg: TunerConfig, run: RunDir) -> None:
    if not run.resume_from:
        return
    own = Path(run.resume_from).parent == run.path
    for skipped in newer_incomplete(run.path, Path(run.resume_from)) if own else []:
        log.warning("%s is not whole (a save cut short, or a file of it cut or damaged since): resuming from %s "
                    "instead", skipped, Path(run.resume_from).name)
    log.info("resuming from %s", run.resume_from)
    if cfg.passthrough.get("save_only_model"):
        log.warning("save_only_model: the checkpoint holds the weights only, so the optimizer's state and the "
                    "learning-rate schedule start afresh")


def _train_backing_off(stage: Stage, parts: TrainerParts, plan, trainer, events: EventWriter, start: dict):
    """``trainer.train()``; after an out-of-memory error in the first step, again with the stage's trainer built for
    a smaller layout (auto-fit's back-off), announced by a second start event. Returns the trainer that trained and
    its result."""
    import torch

    while True:
        smaller = None
        try:
            return trainer, trainer.train(resume_from_checkpoint=parts.run.resume_from)
        except torch.OutOfMemoryError:
            smaller = _backoff(plan, trainer)
            if smaller is None:
                raise UserError(_oom_message(parts.cfg, plan)) from None
        # out of the except block, so the failed attempt's frames (and the activations they hold) are gone
        log.warning("out of GPU memory in the first step with %s: going on with %s", plan.fit.describe(),
                    smaller.fit.describe())
        _release(trainer, parts.model, smaller)
        plan = smaller
        trainer = stage.trainer(parts, plan)
        events.emit(Event.START, **start, speed=plan.features(), batch=_batch(trainer.args, plan), backed_off=True)


def _after_training(cfg: TunerConfig, stage: Stage, trainer, result, model, tokenizer, run: RunDir, divergence,
                    stop: StopAsked, main: bool) -> list[str]:
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
            from engine.train import pissa

            pissa.save_converted(model, run)
    _save_results(cfg, trainer, result, run, main, stage.perplexity)
    if main and cfg.train.plot_loss:
        from engine.train.plots import plot_loss

        plot_loss(run.path, stage.plots)
    return digests


def _save_results(cfg: TunerConfig, trainer, result, run: RunDir, main: bool, perplexity: bool) -> None:
    """LLaMA-Factory's train_results.json and, with ``do_eval``, one evaluation on the eval data (a collective: every
    process takes part; its ``eval`` event is logged as any evaluation's) and eval_results.json with perplexity."""
    from engine.train.results import save_results, with_perplexity

    if main:
        save_results(run.path, "train", result.metrics)
    if cfg.train.do_eval and trainer.eval_dataset is None:  # every sample of it dropped in tokenization
        if main:
            log.warning("do_eval: no evaluation sample is left after tokenization, so there is no evaluation to run")
    elif cfg.train.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        if perplexity:  # exp of a preference loss would be none
            metrics = with_perplexity(metrics)
        if main:
            save_results(run.path, "eval", metrics)


def _agree_on_stop(stop: StopAsked) -> None:
    """After training, every process takes the same path (save or not: a collective under ZeRO-3 and FSDP): a stop
    any of them got by now is every one's (a collective itself, so each process calls it once, at this point)."""
    if not several_processes():
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
    smaller = backoff(plan.fit, plan.longest_sample, plan.shape)
    return replace(plan, fit=smaller) if smaller else None


def _release(trainer, model, smaller) -> None:
    """Free what the failed attempt held on the GPU, and ready the model for checkpointing if the next one uses it."""
    hook = getattr(trainer, "neftune_hook_handle", None)
    if hook is not None:
        hook.remove()  # the Trainer removes NEFTune's hook only when train() returns; the next attempt adds its own
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    model.zero_grad(set_to_none=True)
    _free_gpu_memory()  # the peak the run records is the smaller layout's, not the failed attempt's
    if smaller.fit.gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _oom_message(cfg: TunerConfig, plan) -> str:
    import torch

    gib = 1024**3
    figures = " memory than the GPU has"
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / gib
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / gib
        figures = f" than the {total:.1f} GiB this GPU has (peak allocated {peak:.1f} GiB before the failure)"
    return (f"out of GPU memory: the run needed more{figures} with {plan.fit.describe()}; lower "
            f"per_device_train_batch_size ({cfg.train.per_device_train_batch_size}) and raise "
            f"gradient_accumulation_steps, lower cutoff_len "
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
