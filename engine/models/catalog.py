"""The model catalog (presets/models.yaml): short names, hub ids, templates, each model's geometry, from which
parameter counts come, and the training recipe an entry may carry. Data only: where a name points is
``engine.models.resolve``'s business."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from engine.errors import UserError
from engine.paths import PRESETS_DIR

CATALOG_FILE = PRESETS_DIR / "models.yaml"

_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# What a config.json leaves unsaid but the model type implies (the defaults of its transformers config class).
_TIED_BY_DEFAULT = {"gemma", "gemma2"}
_QKV_BIAS_TYPES = {"qwen2"}
_NORMS_PER_LAYER = {"gemma2": 4}
# Keys that decide what a recipe key decides: setting one (num_train_epochs instead of max_steps, a LoRA setting or a
# quantization against the recipe's full fine-tune) is setting that recipe key.
_STANDS_FOR = {"num_train_epochs": "max_steps", "warmup_steps": "warmup_ratio", "quantization_bit": "finetuning_type",
               "adapter_name_or_path": "finetuning_type", "additional_target": "finetuning_type",
               "use_dora": "finetuning_type", "use_rslora": "finetuning_type", "create_new_adapter": "finetuning_type"}
_STANDS_FOR_PREFIXES = {"lora": "finetuning_type", "pissa_": "finetuning_type", "freeze_": "finetuning_type"}


@dataclass(frozen=True)
class ModelGeometry:
    """The architecture numbers of a decoder-only transformer with a gated MLP: enough to count parameters and
    estimate memory. ``num_local_experts`` is 0 for a dense model."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    qkv_bias: bool = False
    o_bias: bool = False
    norms_per_layer: int = 2


@dataclass(frozen=True)
class ModelSpec:
    """A catalog entry: a model users can name by ``name`` instead of its hub id (None for the demo models)."""

    name: str
    hub_id: str | None
    family: str
    template: str
    lora_target: str
    geometry: ModelGeometry
    demo: bool = False
    recipe: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class RecipeUse:
    """What ``with_recipe`` did: the values to build the config from, the recipe keys it added (none when the model
    has no recipe or the user set one of them otherwise), and the keys that kept it out."""

    values: dict[str, Any]
    model: str | None = None
    demo: bool = False
    applied: dict[str, Any] = field(default_factory=dict)
    overridden: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the terminal, saying what the recipe set or which keys of the user kept it out."""
        name = f"{'demo ' if self.demo else ''}recipe of {self.model}"
        if self.applied:
            keys = ", ".join(f"{key} {value}" for key, value in self.applied.items())
            return f"{name}: {keys} (set any of these keys to train without it)"
        return f"{name} not used: {', '.join(self.overridden)} set"


def model_geometry_from_config(config: dict) -> ModelGeometry:
    """The geometry in a config.json (as a dict), so a local model and a catalog entry are counted the same way."""
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise UserError(
            f"the model's config.json lacks {', '.join(missing)}",
            hint="tuner-tui knows decoder-only models with Llama-style configs (Llama, Mistral, Mixtral, Qwen2, Gemma)",
        )
    model_type = config.get("model_type", "")
    heads = config["num_attention_heads"]
    experts = config.get("num_local_experts") or 0
    attention_bias = bool(config.get("attention_bias", False))
    return ModelGeometry(
        model_type=model_type,
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
        num_local_experts=experts,
        num_experts_per_tok=(config.get("num_experts_per_tok") or 0) if experts else 0,
        qkv_bias=attention_bias or model_type in _QKV_BIAS_TYPES,
        o_bias=attention_bias,
        norms_per_layer=_NORMS_PER_LAYER.get(model_type, 2),
    )


def param_count(model: ModelSpec | ModelGeometry) -> int:
    """Exact number of parameters: embeddings, attention, gated MLP (per expert, plus the router), norms, head."""
    g = model.geometry if isinstance(model, ModelSpec) else model
    hidden = g.hidden_size
    q_width = g.num_attention_heads * g.head_dim
    kv_width = g.num_key_value_heads * g.head_dim
    attention = 2 * hidden * q_width + 2 * hidden * kv_width
    if g.qkv_bias:
        attention += q_width + 2 * kv_width
    if g.o_bias:
        attention += hidden
    mlp = 3 * hidden * g.intermediate_size
    if g.num_local_experts:
        mlp = g.num_local_experts * mlp + hidden * g.num_local_experts
    layer = attention + mlp + g.norms_per_layer * hidden
    embeddings = g.vocab_size * hidden * (1 if g.tie_word_embeddings else 2)
    return g.num_hidden_layers * layer + embeddings + hidden


def with_recipe(values: dict[str, Any]) -> RecipeUse:
    """``values`` (flat config keys as given) with the recipe of the catalog model they name, whole: it applies
    unless a key the user set differs from the recipe's value, or stands for a recipe key (as num_train_epochs does
    for max_steps) at other than its default; a recipe half-applied would mix two trainings, e.g. LoRA at a full
    fine-tune's learning rate."""
    from engine.config.schema import ALIASES

    spec = lookup(str(values.get("model_name_or_path") or ""))
    if spec is None or not spec.recipe or str(values.get("stage") or "sft") != "sft":
        return RecipeUse(dict(values))  # a recipe is a supervised fine-tune's: another stage starts from the defaults
    overridden = []
    for key, value in values.items():
        key = ALIASES.get(key, key)
        if value in ("", None):
            continue
        if key in spec.recipe and not _same(key, value, spec.recipe[key]):
            overridden.append(key)
        elif key not in spec.recipe and _stands_for(key) in spec.recipe and not _is_default(key, value):
            overridden.append(key)
    if overridden:
        return RecipeUse(dict(values), spec.name, spec.demo, overridden=tuple(overridden))
    return RecipeUse({**values, **spec.recipe}, spec.name, spec.demo, dict(spec.recipe))


def _stands_for(key: str) -> str | None:
    return _STANDS_FOR.get(key) or next((to for prefix, to in _STANDS_FOR_PREFIXES.items() if key.startswith(prefix)),
                                        None)


def _is_default(key: str, value: Any) -> bool:
    """A key given at the config's default (a saved config.yaml holds every key) decides nothing."""
    from engine.config.schema import FIELDS

    return key in FIELDS and _same(key, value, FIELDS[key][1].default)


def _same(key: str, given: Any, recipe_value: Any) -> bool:
    from engine.config.schema import coerce

    try:
        return coerce(key, given) == coerce(key, recipe_value)
    except ValueError:
        return False


def list_models() -> list[ModelSpec]:
    """Every catalog entry, in the file's order (demo models first)."""
    return list(_catalog())


def lookup(name_or_hub_id: str) -> ModelSpec | None:
    """The catalog entry with this short name or hub id (case-insensitive), or None."""
    key = name_or_hub_id.strip().lower()
    if not key:
        return None
    for spec in _catalog():
        if key == spec.name.lower() or key == (spec.hub_id or "").lower():
            return spec
    return None


@lru_cache(maxsize=1)
def _catalog() -> tuple[ModelSpec, ...]:
    import yaml

    entries = yaml.safe_load(CATALOG_FILE.read_text(encoding="utf-8"))["models"]
    return tuple(
        ModelSpec(
            name=entry["name"],
            hub_id=entry.get("hub_id"),
            family=entry["family"],
            template=entry["template"],
            lora_target=entry["lora_target"],
            geometry=model_geometry_from_config(entry["config"]),
            demo=entry.get("demo", False),
            recipe=dict(entry.get("recipe") or {}),
        )
        for entry in entries
    )
