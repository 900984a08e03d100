"""``tuner export``: a standalone model from a fine-tune, for any tool that loads Hugging Face models.

A LoRA adapter is merged into its base loaded in 16-bit (never into quantized weights); a full or freeze fine-tune is
taken as it is. Either is saved in the base model's dtype as safetensors shards, with the tokenizer carrying the
training template as its ``chat_template``. The export is written beside ``export_dir``, reloaded and checked
against the fine-tuned model as trained, and only then moved into place.

A reward model (stage rm) is exported whole with its score head (transformers' *ForSequenceClassification, the
adapter's head merged in), and checked by the score it gives the sample conversation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.errors import UserError
from engine.rundir.layout import CONFIG

DTYPES = ("float32", "bfloat16", "float16")
SAMPLE = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And how many days are there in a week?"},
]
# Largest difference allowed between the export's logits and the fine-tuned model's, as a fraction of the largest
# logit (at least 1). fp32 differs only in summation order (~1e-7 measured); a 16-bit export rounds each merged weight
# to 11 (fp16) or 8 (bf16) significant bits and, on a GPU, computes in them too.
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 4e-2}
QUANTIZED_MERGE = ("quantization_bit {bits} ignored for the merge: the base is loaded in 16-bit and the adapter "
                   "merged into it")
# What an export does, for the dashboard's form: a LoRA run's adapter is merged, a full or freeze run has none.
MERGES = ("the LoRA adapter is merged into its base (never a quantized one, even after QLoRA); the result is checked "
          "against base + adapter on a sample before it is moved into place")
RESAVES = ("a full or freeze fine-tune has no adapter to merge: the trained model is saved again in its base's dtype, "
           "with the chat template, and checked against the model as trained on a sample before it is moved into "
           "place")


@dataclass
class ExportSummary:
    directory: Path
    shards: list[str]
    size_bytes: int
    dtype: str
    template: str
    max_diff: float
    limit: float
    merged: bool
    reward: bool = False  # a reward model, exported with its score head


def export_model(cfg: TunerConfig, note: Callable[[str], None] = partial(print, flush=True)) -> ExportSummary:
    """Export as configured and return what was written; a UserError leaves no export_dir behind. ``note`` shows
    what it is doing (loading, writing): `tuner export` wraps the lines to the terminal."""
    from engine.models.resolve import resolve_configured

    target = Path(cfg.export.export_dir).expanduser().absolute()
    adapters = cfg.model.adapter_name_or_path
    resolved = resolve_configured(cfg.model)
    sources = [Path(p.strip()) for p in [resolved.path, *(adapters or "").split(",")] if p.strip()]
    check_target(target, cfg.train.overwrite_output_dir, sources)
    if cfg.model.quantization_bit is not None and adapters:
        print("tuner: warning: " + QUANTIZED_MERGE.format(bits=cfg.model.quantization_bit), file=sys.stderr)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        summary = _export(cfg, resolved, staging, note)
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary.directory = target
    return summary


def export_note(job) -> str:
    """What exporting this run (an ``engine.rundir.jobs.Job``) does with what it trained, in a sentence."""
    from engine.infer.followup import followup_values

    return MERGES if followup_values(job, "export").get("adapter_name_or_path") else RESAVES


def check_target(target: Path, overwrite: bool, sources: list[Path]) -> None:
    """Refuse to replace existing files unless asked, and never the model or adapter being exported."""
    if target.is_file():
        raise UserError(f"export_dir {target} is a file", "choose a directory for export_dir")
    for source in sources:
        if source.exists() and source.resolve().is_relative_to(target.resolve()):
            raise UserError(f"export_dir {target} holds {source}, which is being exported",
                            "choose another export_dir")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"export_dir {target} is not empty; set overwrite_output_dir true to replace it")


def recorded_dtype(model: str, cfg: TunerConfig) -> str | None:
    """The dtype a model's config.json records (``dtype``; ``torch_dtype`` before transformers 5), if a float type;
    a hub model not yet downloaded is asked for its config.json alone."""
    from transformers.utils import cached_file

    m = cfg.model
    try:
        path = cached_file(model, "config.json", revision=m.model_revision, token=m.hf_hub_token, cache_dir=m.cache_dir)
    except OSError:
        return None
    if path is None:  # a local directory without config.json
        return None
    from engine.rundir.files import read_user_text

    try:
        config = json.loads(read_user_text(path, "the model's config.json"))
    except ValueError:
        raise UserError(f"{path} is not JSON: the model's config.json is damaged") from None
    if not isinstance(config, dict):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in DTYPES else None


def export_dtype(model: str, cfg: TunerConfig) -> str:
    """The dtype to save: the original base's for a tuner full or freeze run (they save fp32 weights), else the
    model's own, else fp32."""
    from engine.models.resolve import resolve_model

    run_config = Path(model) / CONFIG
    if run_config.is_file() and not (Path(model) / "adapter_config.json").is_file():
        from engine.config.schema import read_config_file

        origin = read_config_file(run_config).get("model_name_or_path")
        origin = origin if isinstance(origin, str) else None
        try:
            dtype = recorded_dtype(resolve_model(origin).path, cfg) if origin else None
        except UserError:
            dtype = None
        if dtype:
            return dtype
    return recorded_dtype(model, cfg) or "float32"


def merge_device_map(export_device: str, on_gpu: bool):
    """Where the weights are merged: export_device cpu on the CPU; auto across the GPUs there are (else the CPU)."""
    return "auto" if export_device == "auto" and on_gpu else None


def merge_dtype(save_dtype: str, on_gpu: bool, bf16_supported: bool) -> str:
    """The dtype to load and merge in: the saved one on a GPU that computes in it, else fp32."""
    if not on_gpu or (save_dtype == "bfloat16" and not bf16_supported):
        return "float32"
    return save_dtype


def max_shard_size(export_size: int) -> str:
    """export_size in transformers' units: GB are 10**9 bytes."""
    return f"{export_size}GB"


def _export(cfg: TunerConfig, resolved, staging: Path, note: Callable[[str], None]) -> ExportSummary:
    import torch

    from engine.data.tokenize import choose_template
    from engine.infer.inference import trained_template
    from engine.models.loading import Hardware, Precision, is_reward_model, load_adapters, load_model, load_tokenizer
    from engine.templates import get_template, render_text

    adapters = cfg.model.adapter_name_or_path
    hardware = Hardware.detect()
    device_map = merge_device_map(cfg.export.export_device, hardware.on_gpu)
    save = export_dtype(resolved.path, cfg)
    compute = merge_dtype(save, device_map is not None, hardware.bf16_supported)
    template_name = cfg.model.template or trained_template(adapters) or trained_template(resolved.path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, template=template_name, quantization_bit=None))
    tokenizer = load_tokenizer(resolved.path, cfg)
    template = get_template(choose_template(cfg, tokenizer, resolved.spec.template if resolved.spec else None))
    text = render_text(template, SAMPLE, tokenizer)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids

    where = "the GPUs" if device_map else "the CPU"
    note(f"loading {resolved.path} in {compute} on {where}" + (
        f" with adapter {adapters}, to merge it in" if adapters else
        ": no adapter to merge (a full or freeze fine-tune, or any whole model), so it is saved again as it is"))
    precision = Precision({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[compute], "export")
    reward = is_reward_model(resolved.path, adapters, cfg.model)
    model = load_model(resolved.path, cfg, precision, "sdpa", device_map, reward=reward)
    if reward:
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # the score head: last token
    model = load_adapters(model, adapters, quantized=False)
    model.eval()
    expected = _logits(model, ids)
    if adapters:
        model = model.merge_and_unload()
    model.config.use_cache = True  # load_model turns the cache off for training
    model.to(getattr(torch, save))
    if not reward:  # a reward model generates nothing
        _add_stop_words(model.generation_config, tokenizer, template)
    if not template.from_tokenizer:
        from engine.templates import to_chat_template

        tokenizer.chat_template = to_chat_template(template)
    note(f"writing {save} safetensors to {staging}")
    model.save_pretrained(staging, max_shard_size=max_shard_size(cfg.export.export_size))
    tokenizer.save_pretrained(staging)
    del model
    if device_map:
        import gc

        gc.collect()
        torch.cuda.empty_cache()

    max_diff = _check(staging, text, ids, expected, compute, device_map, reward)
    limit = TOLERANCE[save] * max(1.0, expected.abs().max().item())
    if not max_diff <= limit:
        what = "score" if reward else "logits"
        raise UserError(f"the exported model's {what} differ from the fine-tuned model's by up to {max_diff:.3g} "
                        f"(limit {limit:.3g} for {save}); export_dir left unchanged")
    shards = sorted(p.name for p in staging.glob("*.safetensors"))
    return ExportSummary(staging, shards, sum((staging / s).stat().st_size for s in shards), save, template.name,
                         max_diff, limit, bool(adapters), reward)


def _logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _check(directory: Path, text: str, ids, expected, compute: str, device_map, reward: bool = False) -> float:
    """Reload the export as any tool would and return its largest logit (a reward model: score) difference from
    ``expected``; the chat template must render the sample as training did."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    rendered = tokenizer.apply_chat_template(SAMPLE, tokenize=False)
    if rendered != text:
        raise UserError(f"the exported chat_template renders a sample as {rendered[:60]!r}..., "
                        f"training rendered {text[:60]!r}...; export_dir left unchanged")
    if tokenizer(text, add_special_tokens=False).input_ids != ids[0].tolist():
        raise UserError("the exported tokenizer tokenizes a sample differently; export_dir left unchanged")
    loader = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = loader.from_pretrained(directory, dtype=getattr(torch, compute), device_map=device_map)
    model.eval()
    return (_logits(model, ids) - expected).abs().max().item()


def _add_stop_words(generation_config, tokenizer, template) -> None:
    """The template's stop words that are single tokens end generation too, so other tools stop where ours do."""
    eos = generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    for word in template.stop_words:
        token_id = tokenizer.convert_tokens_to_ids(word)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    if ids:
        generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids


def _move_into_place(staging: Path, target: Path) -> None:
    """Swap the checked export in; an old export_dir (when overwriting) is removed only once the new one is there."""
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old)


def render_summary(summary: ExportSummary) -> str:
    files = f"{len(summary.shards)} safetensors " + ("file" if len(summary.shards) == 1 else "shards")
    against = "base + adapter" if summary.merged else "the fine-tuned model"
    size = f"{summary.size_bytes / 1e9:.1f} GB" if summary.size_bytes >= 1e9 else f"{summary.size_bytes / 1e6:.1f} MB"
    what = "the reward model's score of" if summary.reward else "logits of"
    return (f"exported {summary.directory}: {'a reward model with its score head, ' if summary.reward else ''}"
            f"{files}, {size}, {summary.dtype}, chat template {summary.template}\n"
            f"check: {what} a sample conversation match {against} within {summary.max_diff:.2g} "
            f"(largest difference; limit {summary.limit:.2g})")
