"""What the user typed as a model, resolved to something loadable without downloading anything: a local directory, a
demo model (built here on first use), a snapshot in the Hugging Face cache, or a hub id the hub answers for."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine.errors import UserError
from engine.models.catalog import ModelSpec, list_models, lookup

HUB_TIMEOUT_S = 5.0

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


Source = Literal["local", "demo", "hub-cache", "hub"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from: ``path`` is a directory, except for source "hub": the hub id to download."""

    path: str
    spec: ModelSpec | None
    source: Source


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
        from engine.models.demo import demo_model_path

        return ResolvedModel(str(demo_model_path(spec.name)), spec, "demo")
    hub_id = spec.hub_id if spec is not None else name_or_path.strip()
    if not _HUB_ID.fullmatch(hub_id):
        raise _no_such_directory(name_or_path)
    snapshot = _cached_snapshot(hub_id)
    if snapshot is not None:
        return ResolvedModel(str(snapshot), spec, "hub-cache")
    _require_hub(hub_id)
    return ResolvedModel(hub_id, spec, "hub")


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
    known = [spec.name for spec in list_models()] + [spec.hub_id for spec in list_models() if spec.hub_id]
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
