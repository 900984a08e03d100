"""What the user typed as a model, resolved to something loadable without downloading anything: a local directory, a
demo model (built here on first use), a snapshot in the Hugging Face cache, or a hub id whose download is planned and
allowed (access, safetensors, disk) before anything starts."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from engine.errors import UserError
from engine.models.catalog import ModelSpec, list_models, lookup
from engine.models.download import hub_cache_dir

if TYPE_CHECKING:
    from engine.models.download import DownloadPlan

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


Source = Literal["local", "demo", "hub-cache", "hub"]


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load a model from: ``path`` is a directory, except for source "hub": the hub id to download, as
    ``plan`` (engine.models.download) lists."""

    path: str
    spec: ModelSpec | None
    source: Source
    plan: DownloadPlan | None = None


def resolve_model(name_or_path: str, *, revision: str | None = None, token: str | None = None,
                  cache_dir: str | None = None, check_room: bool = True) -> ResolvedModel:
    """Turn what the user typed into something loadable, downloading nothing.

    In order: an existing directory (as in ``from_pretrained``, a directory wins over a name), a demo model (built on
    first use), a catalog name or hub id found whole in the Hugging Face cache (``cache_dir`` when given), a hub id
    this ``token`` may download at ``revision`` with room for it on the cache's disk (else a UserError saying why;
    ``check_room`` false for a caller that reads only its config.json).
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
    snapshot = _cached_snapshot(hub_id, revision, cache_dir)
    if snapshot is not None:
        return ResolvedModel(str(snapshot), spec, "hub-cache")
    from engine.models.download import plan_download

    return ResolvedModel(hub_id, spec, "hub", plan_download(hub_id, revision, token, cache_dir, check_room))


def needs_hub(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> bool:
    """Whether loading this model must reach the hub: a hub id (or catalog name) not whole in the cache, as
    ``resolve_model`` decides, asking the hub nothing."""
    if Path(name_or_path).expanduser().exists():
        return False
    spec = lookup(name_or_path)
    if spec is not None and spec.demo:
        return False
    hub_id = spec.hub_id if spec is not None else name_or_path.strip()
    return bool(_HUB_ID.fullmatch(hub_id)) and _cached_snapshot(hub_id, revision, cache_dir) is None


def resolve_configured(model, check_room: bool = True) -> ResolvedModel:
    """``resolve_model`` for a config's model section: its model, revision, token and cache directory."""
    return resolve_model(model.model_name_or_path, revision=model.model_revision, token=model.hf_hub_token,
                         cache_dir=model.cache_dir, check_room=check_room)


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


def _cached_snapshot(hub_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The snapshot directory of ``hub_id`` if its config.json and all its weights (every shard its index names) are
    in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(hub_id, revision=revision, local_files_only=True,
                                          cache_dir=cache_dir or hub_cache_dir()))
    except LocalEntryNotFoundError:
        return None
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        has_weights = bool(shards) and all((snapshot / shard).is_file() for shard in shards)
    else:
        has_weights = any(snapshot.glob("*.safetensors")) or any(snapshot.glob("pytorch_model*.bin"))
    return snapshot if (snapshot / "config.json").is_file() and has_weights else None
