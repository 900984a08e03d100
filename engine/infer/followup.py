"""Using what a run trained: the config that points predict, chat and export at a run's weights.

`tuner predict|chat|export --run RUN` and the dashboard's keys start from these values; anything the user gives
on top (another dataset, max_samples, export_dir, ...) overrides them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.rundir.checkpoints import checkpoints, has_weights, is_complete
from engine.rundir.jobs import Job
from engine.rundir.layout import CONFIG

# What a follow-up inherits from the run as it was trained: how the model was loaded and how prompts look. Never
# trust_remote_code: a run directory is a file anyone can craft, so running a model's own code is asked for each time.
INHERITED = ("model_name_or_path", "template", "model_revision", "cache_dir", "flash_attn", "dataset_dir",
             "cutoff_len")
NOT_INHERITED_WARNING = ("run {id} was trained with trust_remote_code; it is not carried over from a run's files: "
                         "add --trust_remote_code true if you trust the code that ships with {model}")
FOLLOW_UPS = ("predict", "chat", "export")
TRAINED_ON_WARNING = ("run {id} trained on {datasets}: scores on the data it learned from flatter it; a dataset it "
                      "has not seen gives a fair score")


def trained_weights(job: Job) -> Path:
    """The run's final output when it completed, else its newest checkpoint; UserError when it has none yet."""
    if job.foreign:
        raise UserError(f"{job.dir} was written by another tool",
                        "pass its output to --adapter_name_or_path or --model_name_or_path instead")
    if job.state in ("running", "queued"):
        raise UserError(f"run {job.id} is still {job.state}", "wait for it to finish, or `tuner stop` it first")
    if not job.readable:
        raise UserError(f"run {job.id} cannot be used: its status.json is unreadable")
    if job.state == "completed" and has_weights(job.dir):
        return job.dir
    for checkpoint in reversed(checkpoints(job.dir)):
        if is_complete(checkpoint) and has_weights(checkpoint):
            return checkpoint
    raise UserError(f"run {job.id} ({job.state}) saved no weights yet", "`tuner resume` it to train on")


def run_config_values(job: Job) -> dict[str, Any]:
    """The flat config the run was started with (its config.yaml)."""
    from engine.config.schema import read_config_file

    path = job.dir / CONFIG
    if not path.is_file():
        raise UserError(f"run {job.id} has no config.yaml in {job.dir}")
    return {key: value for key, value in read_config_file(path).items() if value is not None}


def followup_values(job: Job, command: str) -> dict[str, Any]:
    """Config keys for ``command`` (predict, chat, export) on the run's weights, before the user's own overrides.

    A LoRA run's weights are an adapter on its base (kept quantized as trained, except for the export, which
    merges into a 16-bit base); a freeze or full run's weights are a whole model.
    """
    if command not in FOLLOW_UPS:
        raise ValueError(command)
    weights = trained_weights(job)
    trained = run_config_values(job)
    values = {key: trained[key] for key in INHERITED if key in trained}
    if trained.get("finetuning_type", "lora") == "lora":
        values["adapter_name_or_path"] = adapter_chain(trained, str(weights))
        if command != "export" and trained.get("quantization_bit"):
            values["quantization_bit"] = trained["quantization_bit"]
    else:
        values["model_name_or_path"] = str(weights)
    if command == "predict":
        values["dataset"] = trained.get("eval_dataset") or trained.get("dataset")
        values["output_dir"] = str(job.dir / f"predict-{datetime.now():%Y%m%d-%H%M%S}")
    elif command == "export":
        values["export_dir"] = str(job.dir / "merged")
    return {key: value for key, value in values.items() if value is not None}


def adapter_chain(trained: dict[str, Any], weights: str) -> str:
    """The adapters that give a LoRA run's model, from its config's values: those it merged into its base (an
    adapter it trained further is in its own weights already), then its own ``weights``."""
    from engine.models.loading import adapters_trained_on

    merged, _ = adapters_trained_on(trained.get("adapter_name_or_path"), bool(trained.get("create_new_adapter")),
                                    trained.get("stage") == "rm")
    return ",".join([*merged, weights])


def training_data_warning(job: Job, dataset: str | None) -> str | None:
    """The warning for predicting on ``dataset`` (a comma list) when it holds data the run trained on, as a run
    without an eval_dataset does by default: its scores flatter the model. None for data it has not seen."""
    trained = _names(run_config_values(job).get("dataset"))
    seen = [name for name in _names(dataset) if name in trained]
    return TRAINED_ON_WARNING.format(id=job.id, datasets=", ".join(seen)) if seen else None


def _names(datasets: str | None) -> list[str]:
    return [name.strip() for name in str(datasets or "").split(",") if name.strip()]


def load_followup_config(argv: list[str], command: str, warn: Callable[[str], None] | None = None):
    """predict, chat and export: with ``--run RUN`` the run's weights and settings come first, argv on top (both
    faces: `tuner predict|chat|export --run` and the dashboard's forms). Each warning goes to ``warn`` as one
    "tuner: warning: ..." line (by default to stderr as it is; the CLI wraps it to the terminal)."""
    import sys

    from engine.config.argv import CONFIG_SUFFIXES, load_config, take_option
    from engine.rundir.files import printable_line

    warn = warn or (lambda line: print(line, file=sys.stderr))

    run_ref = take_option(argv, "--run")
    if run_ref is None:
        return load_config(argv, command)
    if argv and not argv[0].startswith("-") and "=" not in argv[0] and not argv[0].endswith(CONFIG_SUFFIXES):
        raise UserError(f"`tuner {command} --run {run_ref}` takes its model from the run: leave out '{argv[0]}'",
                        hint="--model_name_or_path puts another base under a LoRA run's adapter")
    from engine.rundir.jobs import find_job

    job = find_job(run_ref)
    cfg = load_config(argv, command, followup_values(job, command))
    if cfg.model.trust_remote_code:
        warn(f"tuner: warning: trust_remote_code is on: the Python code that ships with "
             f"{printable_line(cfg.model.model_name_or_path)} will run")
    elif run_config_values(job).get("trust_remote_code") is True:
        warn("tuner: warning: " + NOT_INHERITED_WARNING.format(id=job.id, model=printable_line(
            cfg.model.model_name_or_path)))
    if command == "predict":
        warning = training_data_warning(job, cfg.data.eval_dataset or cfg.data.dataset)
        if warning:
            warn(f"tuner: warning: {printable_line(warning)}")
    return cfg
