"""The dataset registry: LLaMA-Factory's ``dataset_info.json`` format, bundled entries merged with the user's.

Reading it is cheap (two small JSON files, no heavy imports): config validation calls ``dataset_names``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.paths import PRESETS_DIR

BUNDLED_DIR = PRESETS_DIR / "data"
REGISTRY_FILE = "dataset_info.json"
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet", ".txt")  # .txt: raw text, a sample a line (stage pt)
# LLaMA-Factory's special dataset_dir values: no registry (every name a hub id), and a registry in a hub repository.
ONLINE = "ONLINE"
REMOTE = "REMOTE:"

COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools",
               "images", "videos", "audios", "chosen", "rejected", "kto_tag")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")

# LLaMA-Factory's defaults: a "columns" mapping replaces these whole (an unnamed column is not read).
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {"messages": "messages"},
}
# A "tags" mapping overrides these one by one.
DEFAULT_TAGS = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function", "system_tag": "system"},
}
DEFAULT_TAGS["alpaca"] = DEFAULT_TAGS["sharegpt"]

# Where an entry's data comes from, in LLaMA-Factory's order of preference.
SOURCE_KEYS = {"hf_hub_url": "hf_hub", "ms_hub_url": "ms_hub", "om_hub_url": "om_hub",
               "script_url": "script", "cloud_file_name": "cloud_file", "file_name": "file"}


@dataclass
class DatasetAttr:
    """One dataset: where to read it and how its records map to conversations.

    ``load_from`` is "file", "hf_hub", "ms_hub", "om_hub", "script" or "cloud_file"; ``location`` the absolute path
    (file or folder) or the hub id. ``formatting`` None means: detect it from the first record's columns when loaded;
    an unknown one is reported when the dataset is converted, so one bad entry does not break the whole registry.
    """

    name: str
    load_from: str
    location: str
    formatting: str | None = "alpaca"
    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS["alpaca"]))
    tags: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TAGS["alpaca"]))
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None

    @property
    def kind(self) -> str:
        """What the entry holds, from the entry alone: "pairs" (ranking), "text" (one prompt column: raw text),
        "feedback" (conversations with a kto_tag) or "conversations"; STAGE_KINDS says which stage trains on
        which."""
        if self.ranking:
            return "pairs"
        if "kto_tag" in self.columns:
            return "feedback"
        return "text" if self.formatting == "alpaca" and set(self.columns) == {"prompt"} else "conversations"


# The kinds of dataset each stage trains on, the first the kind of sample it reads them as
# (engine.data.converters.convert): supervised fine-tuning learns a kto dataset's desirable replies (LLaMA-Factory's
# kto_tag true) and drops the rest.
STAGE_KINDS = {"sft": ("conversations", "feedback"), "dpo": ("pairs",), "kto": ("feedback",), "rm": ("pairs",),
               "pt": ("text",)}


def load_registry(dataset_dir: str | None) -> dict[str, DatasetAttr]:
    """The bundled registry merged with ``<dataset_dir>/dataset_info.json``; the user's entries win on a name clash.

    A dataset_dir without that file (the default "data" where no such folder exists) adds nothing; "ONLINE", as in
    LLaMA-Factory, reads no registry of the user's: every other name is a hub id.
    """
    registry = _read_registry(BUNDLED_DIR)
    if dataset_dir is not None and dataset_dir != ONLINE:
        _refuse_remote(dataset_dir)
        registry.update(_read_registry(Path(dataset_dir)))
    return registry


def dataset_names(dataset_dir: str | None) -> list[str]:
    """Every registered name, bundled first, in file order."""
    return list(load_registry(dataset_dir))


def resolve_dataset(name: str, dataset_dir: str | None) -> DatasetAttr:
    """A registered name, else a local file or folder (as given or under dataset_dir), else a hub id ("org/name")."""
    registry = load_registry(dataset_dir)
    if name in registry:
        return registry[name]
    folder = None if dataset_dir in (None, ONLINE) else Path(dataset_dir)
    tried = [Path(name).expanduser()]
    if folder is not None and not Path(name).is_absolute():
        tried.append(folder / name)
    for path in tried:
        if path.is_dir() or (path.is_file() and path.suffix in FILE_TYPES):
            return DatasetAttr(name=name, load_from="file", location=str(path.resolve()), formatting=None, columns={})
    if _looks_like_path(name):
        raise UserError(f"dataset file not found: {name} (tried {', '.join(str(p) for p in tried)})",
                        hint=f"a local dataset is a {'/'.join(FILE_TYPES)} file or a folder of them")
    if "/" in name or dataset_dir == ONLINE:
        return DatasetAttr(name=name, load_from="hf_hub", location=name, formatting=None, columns={})
    closest = difflib.get_close_matches(name, list(registry), n=5, cutoff=0)
    hint = (f'register it in {Path(dataset_dir or "<dataset_dir>") / REGISTRY_FILE} as '
            f'{{"{name}": {{"file_name": "{name}.json"}}}}, or pass a path to a file or folder, or a hub id')
    if folder is not None and not folder.is_dir():
        hint += f"; or set dataset_dir to the folder that holds your {REGISTRY_FILE}"
    raise UserError(f"unknown dataset '{name}'; closest registered names: {', '.join(closest)} "
                    f"({len(registry)} registered{_missing_registry(folder)})", hint=hint)


def absolute_dataset_dir(dataset_dir: str | None) -> str | None:
    """dataset_dir as an absolute path, so a run started again from elsewhere reads the same registry; "ONLINE" kept."""
    if not dataset_dir or dataset_dir == ONLINE:
        return dataset_dir or None
    return str(Path(dataset_dir).absolute())


def _missing_registry(folder: Path | None) -> str:
    """Why dataset_dir added no names, when it added none: it is absent, not a folder, or has no dataset_info.json."""
    if folder is None:
        return ""
    if not folder.exists():
        return f"; dataset_dir {folder} does not exist"
    if not folder.is_dir():
        return f"; dataset_dir {folder} is not a folder"
    return "" if (folder / REGISTRY_FILE).is_file() else f"; dataset_dir {folder} has no {REGISTRY_FILE}"


def _refuse_remote(dataset_dir: str) -> None:
    if dataset_dir.startswith(REMOTE):
        raise UserError(f"dataset_dir {dataset_dir}: a {REGISTRY_FILE} read from the hub is not supported",
                        hint=f"download that repository and set dataset_dir to its folder, or use dataset_dir "
                             f"{ONLINE} to load every dataset by its hub id")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in FILE_TYPES


def _read_registry(folder: Path) -> dict[str, DatasetAttr]:
    path = folder / REGISTRY_FILE
    if not path.is_file():
        return {}
    from engine.rundir.files import read_user_text

    text = read_user_text(path, "dataset registry")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a dataset registry") from None
    if not isinstance(entries, dict):
        raise UserError(f"{path}: expected a JSON object mapping dataset names to entries")
    return {name: _parse_entry(name, entry, folder, path) for name, entry in entries.items()}


def _parse_entry(name: str, entry: object, folder: Path, path: Path) -> DatasetAttr:
    where = f"{path}: dataset '{name}'"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping such as {{\"file_name\": \"data.json\"}}, got {_kind(entry)}")
    source = next((key for key in SOURCE_KEYS if key in entry), None)
    if source is None:
        raise UserError(f"{where} has no source", hint=f"give one of: {', '.join(SOURCE_KEYS)}")
    _check_types(where, source, entry)
    formatting = entry.get("formatting", "alpaca")
    location = entry[source]
    if source == "file_name":
        location = str((folder / location).resolve())
    columns = DEFAULT_COLUMNS.get(formatting, {})
    if "columns" in entry:
        columns = {key: entry["columns"][key] for key in COLUMN_KEYS if entry["columns"].get(key)}
    return DatasetAttr(
        name=name,
        load_from=SOURCE_KEYS[source],
        location=location,
        formatting=formatting,
        columns=dict(columns),
        tags={**DEFAULT_TAGS.get(formatting, {}), **{k: v for k, v in entry.get("tags", {}).items() if k in TAG_KEYS}},
        ranking=entry.get("ranking", False),
        subset=entry.get("subset"),
        split=entry.get("split", "train"),
        folder=entry.get("folder"),
        num_samples=entry.get("num_samples"),
    )


def _is_text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _is_text_or_null(value: object) -> bool:
    return value is None or isinstance(value, str)


def _is_count_or_null(value: object) -> bool:
    return value is None or (type(value) is int and value >= 1)


# The fields of an entry besides its source, with the JSON type each must have and how a message describes it.
ENTRY_FIELDS = {
    "formatting": (_is_text_or_null, "a string such as alpaca, sharegpt or openai"),
    "columns": (lambda v: isinstance(v, dict), "a mapping of column roles to column names"),
    "tags": (lambda v: isinstance(v, dict), 'a mapping such as {"role_tag": "from", "content_tag": "value"}'),
    "split": (_is_text, "a split name such as train"),
    "subset": (_is_text_or_null, "a subset name (a string)"),
    "folder": (_is_text_or_null, "a folder name (a string)"),
    "ranking": (lambda v: isinstance(v, bool), "true or false"),
    "num_samples": (_is_count_or_null, "a whole number of at least 1"),
}


def _check_types(where: str, source: str, entry: dict) -> None:
    """Refuse a field of the wrong JSON type in one line naming the field, before any of it is used."""
    if not _is_text(entry[source]):
        what = "a file or folder path" if source == "file_name" else "a hub id or URL"
        raise UserError(f'{where}: "{source}" must be {what} (a string), got {_kind(entry[source])}')
    for key, (valid, expected) in ENTRY_FIELDS.items():
        if key in entry and not valid(entry[key]):
            raise UserError(f'{where}: "{key}" must be {expected}, got {_kind(entry[key])}')
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    for key in COLUMN_KEYS:
        if key in columns and not _is_text_or_null(columns[key]):
            raise UserError(f'{where}: "{key}" in "columns" must be a column name (a string), '
                            f'got {_kind(columns[key])}')
    for key in TAG_KEYS:
        if key in tags and not _is_text(tags[key]):
            raise UserError(f'{where}: "{key}" in "tags" must be a string, got {_kind(tags[key])}')


def _kind(value: object) -> str:
    """A JSON value as a message names it: a list, a string, a number, true, null."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "an empty string" if value == "" else "a string"
    return "a mapping" if isinstance(value, dict) else "a list"
