"""The training fields of the installed transformers (``TrainingArguments``) and TRL (``SFTConfig``), so every field
is accepted as a config key.

The fields and their types come from the classes themselves (``dataclasses.fields``, ``typing.get_type_hints``): a
field a new transformers adds is accepted the day it is installed, and one it removes is unknown again. Importing
them takes seconds, so what was read is kept in the cache, keyed by the two libraries' versions: `tuner --help` and
the wizard read that file, and only the first use after an upgrade pays for the import.

A field tuner declares itself (``learning_rate``, ``bf16`` ...) is tuner's; a field the engine sets from one of its
own keys is refused with that key's name (``ENGINE_SET``); every other field passes through to ``SFTConfig``
unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import logging
import os
import types
import typing
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from engine.paths import cache_dir

log = logging.getLogger("tuner")

# The packages whose training arguments pass through; SFTConfig's own fields and its bases' (TrainingArguments, TRL's
# _BaseConfig), each owned by the class that declares it.
PACKAGES = ("transformers", "trl")
CACHE_FORMAT = 1  # bump when what the cache file holds changes

# Fields the engine sets from its own keys or decisions; a user naming one is told what to use instead.
ENGINE_SET = {
    "max_length": "cutoff_len sets the longest sample (and max_new_tokens the longest generated answer)",
    "max_seq_length": "cutoff_len sets the longest sample",
    "dataset_num_proc": "use preprocessing_num_workers",
    "dataset_text_field": "tuner renders and tokenizes the data itself with the template: set template",
    "dataset_kwargs": "tuner renders and tokenizes the data itself",
    "completion_only_loss": "tuner learns the replies only; set train_on_prompt true to learn the prompt too",
    "assistant_only_loss": "tuner learns the replies only; set train_on_prompt true to learn the prompt too",
    "truncation_mode": "tuner cuts prompt and reply in proportion to cutoff_len, keeping the reply's end",
    "packing_strategy": "use packing (tuner packs best-fit-decreasing)",
    "eval_packing": "evaluation data is never packed",
    "chat_template_path": "use template",
    "eos_token": "the template decides the end-of-turn token",
    "pad_token": "tuner pads with the tokenizer's pad token (or eos)",
    "model_init_kwargs": "use the model keys (quantization_bit, flash_attn, trust_remote_code, ...)",
    "use_cpu": "tuner trains on the GPUs when there are: hide them with CUDA_VISIBLE_DEVICES= to train on the CPU",
    "disable_tqdm": "the progress goes to the run's events and train.log",
    "include_num_input_tokens_seen": "tuner always counts the tokens trained on",
    "include_tokens_per_second": "tuner's events record tokens_per_s",
    "remove_unused_columns": "tuner's data has only the columns it trains on",
    "label_names": "tuner's data has only the columns it trains on",
    "loss_type": "tuner chooses the loss (and learns the replies only)",
    "liger_kernel_config": "use enable_liger_kernel",
    "activation_checkpointing": "use gradient_checkpointing",
    "save_safetensors": "tuner writes safetensors only",
    "local_rank": "set by torchrun",
    "parallelism_config": "use fsdp or deepspeed",
    "logging_nan_inf_filter": "tuner stops a run whose loss is not finite",
    "shuffle_dataset": "the training order is shuffled with seed (data_seed sets it apart from seed)",
    "auto_find_batch_size": "auto_fit chooses the batch for the GPU's memory and backs off when it runs out",
    "use_cache": "tuner trains without the KV cache (generation uses it)",
}


@dataclass(frozen=True)
class LibraryField:
    """One field of a library's training arguments: its name, the plain types its annotation allows (bool, int,
    float, str, dict, list, in the order written), whether it takes None, its default and help."""

    name: str
    kinds: tuple[str, ...]
    optional: bool
    default: Any
    help: str
    owner: str  # the class that declares it, for the help text


def kept_fields_path() -> Path | None:
    """The cache file for the installed versions (None without transformers); it may not exist yet."""
    versions = _versions()
    if "transformers" not in versions:
        return None
    return cache_dir() / "library-fields" / ("-".join(f"{p}{v}" for p, v in versions.items()) + f"-{CACHE_FORMAT}.json")


@functools.cache
def library_fields() -> dict[str, LibraryField]:
    """Every training field of the installed transformers and TRL (SFTConfig's, else TrainingArguments' alone), from
    the cache when these versions were read before."""
    path = kept_fields_path()
    if path is None:
        return {}
    try:
        kept = {f["name"]: LibraryField(**{**f, "kinds": tuple(f["kinds"])}) for f in json.loads(path.read_text())}
        if "learning_rate" in kept:  # else not what this module writes: read the classes again
            return kept
    except (OSError, ValueError, TypeError, KeyError):
        pass
    fields = _read_classes()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps([dataclasses.asdict(f) for f in fields.values()]))
        temporary.replace(path)
    except OSError as exc:  # a read-only cache: read the classes again next time
        log.debug("could not keep the library fields in %s: %s", path, exc)
    return fields


def _versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _read_classes() -> dict[str, LibraryField]:
    try:
        from trl import SFTConfig as arguments
    except ImportError:
        from transformers import TrainingArguments as arguments
    try:
        hints = typing.get_type_hints(arguments)
    except (NameError, TypeError):  # an annotation this Python cannot resolve: each field's own, where it is a type
        hints = {f.name: f.type for f in dataclasses.fields(arguments) if not isinstance(f.type, str)}
    fields = {}
    for f in dataclasses.fields(arguments):
        if not f.init or f.name.startswith("_"):
            continue
        hint = hints.get(f.name, Any)
        owner = next((cls.__name__ for cls in arguments.__mro__ if f.name in vars(cls).get("__annotations__", {})),
                     arguments.__name__)
        fields[f.name] = LibraryField(f.name, _kinds(hint), type(None) in typing.get_args(hint), _plain(f.default),
                                      " ".join(str(f.metadata.get("help", "")).split()), owner)
    return fields


KINDS = {bool: "bool", int: "int", float: "float", str: "str", dict: "dict", list: "list"}


def _kinds(hint: Any) -> tuple[str, ...]:
    """The plain types an annotation allows, in the order written; an enum (transformers' strategies) takes its
    value as text, a list's items are not looked into."""
    found: list[str] = []
    for member in typing.get_args(hint) if _is_union(hint) else (hint,):
        base = typing.get_origin(member) or member
        if base is typing.Literal:
            kind = KINDS.get(type(typing.get_args(member)[0])) if typing.get_args(member) else None
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            kind = "str"
        else:
            kind = KINDS.get(base)
        if kind and kind not in found:
            found.append(kind)
    return tuple(found)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union or isinstance(hint, types.UnionType)


def _plain(default: Any) -> Any:
    """A default as the help shows it and JSON keeps it: an enum's value; None for a factory's or an object."""
    if isinstance(default, enum.Enum):
        default = default.value
    return default if isinstance(default, (bool, int, float, str, type(None))) else None


def passthrough_fields(own: set[str]) -> dict[str, LibraryField]:
    """The library fields that pass through: neither tuner's own keys nor set by the engine."""
    return {name: f for name, f in library_fields().items() if name not in own and name not in ENGINE_SET
            and not name.startswith("_")}


def coerce_library(field_: LibraryField, value: Any) -> Any:
    """A value from YAML or the command line as the field's annotation allows; ValueError with the reason."""
    kinds = field_.kinds
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and field_.optional):
        if field_.optional:
            return None
        raise ValueError("needs a value")
    if isinstance(value, bool) and "bool" in kinds:
        return value
    if "dict" in kinds and isinstance(value, dict):
        return value
    if "dict" in kinds and isinstance(value, str) and value.strip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not valid JSON: {exc.msg}") from None
        if isinstance(parsed, dict):
            return parsed
    if "list" in kinds and isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    for kind in kinds:
        converted = _convert(kind, value)
        if converted is not _NO:
            return converted
    if "list" in kinds and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    expected = " or ".join({"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text",
                            "dict": "a mapping (YAML, or JSON text)", "list": "a list"}.get(k, k) for k in kinds)
    raise ValueError(f"expected {expected or 'a value'}, got {value!r}")


_NO = object()
TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


def flag_word(value: Any) -> bool | None:
    """A bool, or a true/false word as YAML and command lines spell it; None for anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    return True if text in TRUE_WORDS else False if text in FALSE_WORDS else None


def _convert(kind: str, value: Any) -> Any:
    if kind == "bool":
        flag = flag_word(value)
        return _NO if flag is None else flag
    if kind in ("int", "float"):
        if isinstance(value, bool):
            return _NO
        try:
            number = float(value)
        except (TypeError, ValueError):
            return _NO
        if kind == "int":
            return int(number) if number.is_integer() else _NO
        return number
    if kind == "str":
        return value if isinstance(value, str) else _NO
    return _NO
