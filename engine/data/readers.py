"""Reading a dataset's raw records: local json / jsonl / csv / parquet files, folders of them, or the hub.

Errors name the file and, for JSON, the line and column, so a user can open the file at the fault.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from engine.data.registry import FILE_TYPES, REGISTRY_FILE, DatasetAttr
from engine.errors import UserError

UNSUPPORTED_SOURCES = {"ms_hub": "the ModelScope hub", "om_hub": "the Modelers (OpenMind) hub",
                       "script": "a loading script", "cloud_file": "a cloud file"}
LOCAL_HINT = "download it and register it with a file_name, or pass a path to a local file"


def read_records(attr: DatasetAttr) -> list[dict]:
    """All records of one dataset (of its ``split``), as plain dicts."""
    if attr.load_from == "file":
        return _split_of(attr, _read_local(attr))
    if attr.load_from == "hf_hub":
        return _read_hub(attr)
    raise UserError(f"dataset '{attr.name}' is loaded from {UNSUPPORTED_SOURCES[attr.load_from]} "
                    f"({attr.location}), which is not supported", hint=LOCAL_HINT)


def read_file(path: Path) -> list[dict]:
    """The records of one local file, read by its extension."""
    reader = {".json": _read_json, ".jsonl": _read_json_lines, ".csv": _read_csv, ".parquet": _read_parquet,
              ".txt": _read_text}.get(path.suffix)
    if reader is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'", hint=f"use one of {', '.join(FILE_TYPES)}")
    try:
        return reader(path)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _split_of(attr: DatasetAttr, records: list[dict]) -> list[dict]:
    """The records ``split`` names, as ``datasets.load_dataset`` reads a local file: it holds one split, train, and
    a slice of it such as ``train[:100]``, ``train[10%:20%]`` or ``train[:50]+train[-50:]`` takes part of it."""
    if attr.split == "train":
        return records
    from datasets import ReadInstruction

    try:
        parts = ReadInstruction.from_spec(attr.split).to_absolute({"train": len(records)})
    except (ValueError, AssertionError) as err:
        raise UserError(f"dataset '{attr.name}': split {attr.split!r}: {err}",
                        hint="a local file holds one split, train: give train or a slice such as train[:100]") from None
    return [record for part in parts for record in records[part.from_:part.to]]


def _read_local(attr: DatasetAttr) -> list[dict]:
    path = Path(attr.location)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_TYPES and p.suffix != ".txt"
                       and p.name != REGISTRY_FILE) or sorted(path.glob("*.txt"))  # notes beside data stay notes
        if not files:
            raise UserError(f"dataset '{attr.name}': folder {path} has no {', '.join(FILE_TYPES)} files")
        return [record for file in files for record in read_file(file)]
    if not path.is_file():
        raise UserError(f"dataset '{attr.name}': file not found: {path}")
    return read_file(path)


def _read_json(path: Path) -> list[dict]:
    """A JSON list of records or, as LLaMA-Factory and `datasets` accept too, JSON lines in a .json file."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        return _parse_json_lines(path, text)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(f"{path}: record {index} is a {type(record).__name__}, not a JSON object")
    return records


def _read_json_lines(path: Path) -> list[dict]:
    return _parse_json_lines(path, path.read_text(encoding="utf-8-sig"))


def _parse_json_lines(path: Path, text: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {lineno}, column {err.colno}: {err.msg}",
                            hint="a JSON dataset is a list of records, or one record per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {lineno} is a {type(record).__name__}, not a JSON object")
        records.append(record)
    return records


def _read_text(path: Path) -> list[dict]:
    """Raw text as `datasets`' text builder reads it: a record ``{"text": line}`` for each line that holds any."""
    return [{"text": line} for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        try:
            return list(reader)
        except csv.Error as err:
            raise UserError(f"{path}: invalid CSV at line {reader.line_num}: {err}") from None


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:
        raise UserError(f"{path}: not a readable Parquet file: {err}") from None


def _read_hub(attr: DatasetAttr) -> list[dict]:
    """Through `datasets.load_dataset`, which also finds a copy cached earlier when the hub is offline."""
    import datasets

    try:
        dataset = datasets.load_dataset(attr.location, name=attr.subset, data_dir=attr.folder, split=attr.split)
    except ConnectionError:
        raise UserError(f"dataset '{attr.name}' needs the Hugging Face hub ({attr.location}), which cannot be reached",
                        hint=f"download it while online (it is cached then), or {LOCAL_HINT}") from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise UserError(f"dataset '{attr.name}': {err}") from None
    return dataset.to_list()
