"""The training fields of the installed transformers (``TrainingArguments``) and TRL (``SFTConfig``), read from their
source files without importing them, so every field is accepted as a config key and `tuner --help` stays fast.

A field tuner declares itself (``learning_rate``, ``bf16`` ...) is tuner's; a field the engine sets from one of its
own keys is refused with that key's name (``ENGINE_SET``); every other field passes through to ``SFTConfig``
unchanged. Reading the source keeps this in step with whatever version is installed: a field a new transformers
adds is accepted the day it is installed, and one it removes is unknown again.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The classes whose fields pass through, as (package, file inside it, class name).
SOURCES = (
    ("transformers", "training_args.py", "TrainingArguments"),
    ("trl", "trainer/base_config.py", "_BaseConfig"),
    ("trl", "trainer/sft_config.py", "SFTConfig"),
)

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
    """One field of a library's training arguments: its name, its annotation as written, default and help."""

    name: str
    annotation: str
    default: Any
    help: str
    owner: str  # the class it comes from, for the help text

    @property
    def kinds(self) -> tuple[str, ...]:
        """The plain types the annotation allows, in the order written: bool, int, float, str, dict, list."""
        text = self.annotation.replace("Optional[", "").replace("Union[", "")
        found = []
        for token in (t.strip(" ]") for t in text.replace(",", "|").split("|")):
            base = token.split("[")[0].strip()
            kind = {"bool": "bool", "int": "int", "float": "float", "str": "str", "dict": "dict", "Dict": "dict",
                    "list": "list", "List": "list"}.get(base)
            if kind is None and base.endswith(("Strategy", "Type", "Names", "Option")):
                kind = "str"  # transformers' enums take their value as text
            if kind and kind not in found:
                found.append(kind)
        return tuple(found)

    @property
    def optional(self) -> bool:
        return "None" in self.annotation or "Optional" in self.annotation


@functools.cache
def library_fields() -> dict[str, LibraryField]:
    """Every field of the classes in SOURCES that the installed packages have, later classes winning."""
    fields: dict[str, LibraryField] = {}
    for package, relative, class_name in SOURCES:
        path = _source(package, relative)
        if path is None:
            continue
        for item in _dataclass_fields(path, class_name):
            fields[item.name] = item
    return fields


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


def _source(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / relative
    return path if path.is_file() else None


@functools.cache
def _dataclass_fields(path: Path, class_name: str) -> tuple[LibraryField, ...]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return tuple(_field(statement, class_name) for statement in node.body
                         if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name))
    return ()


def _field(statement: ast.AnnAssign, owner: str) -> LibraryField:
    default, help_text = None, ""
    value = statement.value
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for keyword in value.keywords:
            if keyword.arg == "default":
                default = _literal(keyword.value)
            elif keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                for k, v in zip(keyword.value.keys, keyword.value.values):
                    if isinstance(k, ast.Constant) and k.value == "help":
                        help_text = _literal(v) or ""
    elif value is not None:
        default = _literal(value)
    return LibraryField(statement.target.id, ast.unparse(statement.annotation), default,
                        " ".join(str(help_text).split()), owner)


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
