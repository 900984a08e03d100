"""The model catalog (presets/models.yaml) and where a model name points: a directory, a demo model or the hub.

Everything here works offline: the catalog is data, parameter counts come from the architecture numbers, and
``resolve_model`` asks the hub only whether it can be reached, when a model is neither local nor cached.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from engine.errors import UserError
from engine.paths import PRESETS_DIR

CATALOG_FILE = PRESETS_DIR / "models.yaml"
HUB_TIMEOUT_S = 5.0

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# What a config.json leaves unsaid but the model type implies (the defaults of its transformers config class).
_TIED_BY_DEFAULT = {"gemma", "gemma2"}
_QKV_BIAS_TYPES = {"qwen2"}
_NORMS_PER_LAYER = {"gemma2": 4}


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


Source = Literal["local", "demo", "hub-cache", "hub"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from: ``path`` is a directory, except for source "hub": the hub id to download."""

    path: str
    spec: ModelSpec | None
    source: Source


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


def list_models() -> list[ModelSpec]:
    """Every catalog entry, in the file's order (demo models first)."""
    return list(_catalog())


def lookup(name_or_hub_id: str) -> ModelSpec | None:
    """The catalog entry with this short name or hub id (case-insensitive), or None."""
    key = name_or_hub_id.strip().lower()
    for spec in _catalog():
        if key == spec.name.lower() or key == (spec.hub_id or "").lower():
            return spec
    return None


def resolve_model(name_or_path: str) -> ResolvedModel:
    """Turn what the user typed into something loadable, downloading nothing.

    In order: an existing directory (as in ``from_pretrained``, a directory wins over a name), a demo model (built on
    first use), a catalog name or hub id found in the local Hugging Face cache, a hub id the hub answers for.
    """
    local = Path(name_or_path).expanduser()
    if local.exists():
        return ResolvedModel(str(_checked_model_dir(local)), None, "local")
    spec = lookup(name_or_path)
    if spec is not None and spec.demo:
        from engine.demo import demo_model_path

        return ResolvedModel(str(demo_model_path(spec.name)), spec, "demo")
    hub_id = spec.hub_id if spec is not None else name_or_path.strip()
    if not _HUB_ID.fullmatch(hub_id):
        raise _no_such_directory(name_or_path)
    snapshot = _cached_snapshot(hub_id)
    if snapshot is not None:
        return ResolvedModel(str(snapshot), spec, "hub-cache")
    _require_hub(hub_id)
    return ResolvedModel(hub_id, spec, "hub")


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
        )
        for entry in entries
    )


def _checked_model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"{path} is a file, not a model directory", hint="pass the directory that holds config.json")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            hint = "it holds a LoRA adapter: pass its base model here and this directory as adapter_name_or_path"
        else:
            hint = "a model directory holds config.json, the weights (*.safetensors) and the tokenizer files"
        raise UserError(f"{path} has no config.json", hint=hint)
    return path.resolve()


def _no_such_directory(name: str) -> UserError:
    known = [spec.name for spec in _catalog()] + [spec.hub_id for spec in _catalog() if spec.hub_id]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    hint += "Pass a directory with config.json, a name from `tuner models`, or a hub id like org/name"
    return UserError(f"no such directory: {name}", hint=hint)


def _cached_snapshot(hub_id: str) -> Path | None:
    """The snapshot directory of ``hub_id`` if its config.json and weights are in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(hub_id, local_files_only=True, cache_dir=_hub_cache_dir()))
    except LocalEntryNotFoundError:
        return None
    has_weights = any(snapshot.glob("*.safetensors")) or any(snapshot.glob("pytorch_model*.bin"))
    return snapshot if (snapshot / "config.json").is_file() and has_weights else None


def _hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, read from the environment now (the library reads it once, at import)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(cache).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser() / "hub"


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in {"1", "ON", "YES", "TRUE"}


def _require_hub(hub_id: str) -> None:
    """Return if the hub answers for ``hub_id`` within HUB_TIMEOUT_S, else raise the user's error.

    Any failure to answer counts as unreachable: the HTTP library under huggingface_hub (requests, httpx, httpx2)
    and so its exception types change between versions.
    """
    if not _hub_offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            HfApi(endpoint=os.environ.get("HF_ENDPOINT")).model_info(hub_id, timeout=HUB_TIMEOUT_S)
            return
        except RepositoryNotFoundError:
            raise UserError(
                f"{hub_id} is not a model on the Hugging Face hub",
                hint="check the spelling; a private or gated model needs `hf auth login` first",
            ) from None
        except Exception:
            pass
    raise UserError(
        f"{hub_id} is not in the local Hugging Face cache and the hub cannot be reached",
        hint=f"download it on a connected machine (`hf download {hub_id}`) and copy the cache over, "
        "or pass a local directory",
    )
