"""Conversations to token ids and labels through the chosen template: what the trainer and the preview both see.

Training data is prepared once: ``build_datasets`` tokenizes with ``datasets.map`` (in ``preprocessing_num_workers``
processes, every segment of a batch in one fast-tokenizer call) and keeps the result in a cache keyed by the
conversations and their tools, the template and default system prompt, the tokenizer, the cutoff and the masking, so
a resume, a second run on the same data and the other processes of a multi-GPU run load it in seconds. The first
process to take the cache entry's lock prepares it; the others wait on the lock and load what it wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.data.loaders import load_conversations
from engine.data.stats import Lengths
from engine.errors import UserError, disk_full
from engine.paths import cache_dir
from engine.world import local_rank
from engine.templates import AUTO, IGNORE_INDEX, Template, encode_many, get_template, template_mismatch

log = logging.getLogger("tuner")

CACHE_FORMAT = 2  # bump when what a cache entry holds, or how it is made, changes
META = "meta.json"
SAMPLES_PER_WORKER = 10_000  # below this a worker process costs more than it saves
MAX_WORKERS = 8


def choose_template(cfg: TunerConfig, tokenizer, catalog_template: str | None = None) -> str:
    """The asked template, else the catalog's for this model, else the tokenizer's own, else ``default``."""
    if cfg.model.template:
        return cfg.model.template
    if catalog_template:
        return catalog_template
    return AUTO if getattr(tokenizer, "chat_template", None) else "default"


def training_template(name: str, default_system: str | None = None) -> Template:
    """The template the data is tokenized with: ``name``'s, with data.default_system in place of its own default
    (under ``auto``, given to the tokenizer's chat_template as the system message of conversations without one)."""
    template = get_template(name)
    if default_system is None:
        return template
    return dataclasses.replace(template, default_system=default_system)


# --- one conversation's ids and labels, cut to cutoff_len ------------------------------------------------------------


@dataclass(frozen=True)
class Masking:
    """How a conversation is cut and which of its tokens are learned (the data section's keys)."""

    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False


def _cut(turns, masking: Masking) -> tuple[dict | None, str | None]:
    """The row kept for training, or the reason it is dropped."""
    if turns is None:
        return None, "no reply to learn"
    sample = turns.sample(masking.cutoff_len, train_on_prompt=masking.train_on_prompt,
                          mask_history=masking.mask_history)
    if all(label == IGNORE_INDEX for label in sample.labels):
        return None, f"no reply left within cutoff_len={masking.cutoff_len}"
    return {"input_ids": sample.input_ids, "labels": sample.labels}, None


@dataclass
class Encoded:
    rows: list[dict]
    dropped: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)  # before truncation, of every sample with a reply
    truncated: int = 0


def encode_conversations(conversations: list[dict], tokenizer, template_name: str, cutoff_len: int,
                         train_on_prompt: bool = False, *, mask_history: bool = False,
                         default_system: str | None = None) -> Encoded:
    """``{"input_ids", "labels"}`` rows, each cut to cutoff_len; conversations left with nothing to learn are dropped
    and counted."""
    template = training_template(template_name, default_system)
    masking = Masking(cutoff_len, train_on_prompt, mask_history)
    encoded = Encoded(rows=[])
    tools = [c.get("tools") for c in conversations]
    for turns in encode_many(tokenizer, template, [c["messages"] for c in conversations], tools):
        if turns is not None:
            encoded.lengths.append(turns.length)
        row, dropped = _cut(turns, masking)
        if row is None:
            encoded.dropped[dropped] += 1
            continue
        encoded.truncated += turns.length > cutoff_len
        encoded.rows.append(row)
    return encoded


def _encode_batch(batch: dict, tokenizer, template_name: str, default_system: str | None, masking: Masking,
                  stop_flag: str | None = None) -> dict:
    """``datasets.map``'s function: a batch of conversations to columns (dropped rows kept, marked, for counting);
    PreparationStopped instead when ``stop_flag`` exists (a stop came)."""
    if stop_flag is not None and os.path.exists(stop_flag):
        raise PreparationStopped("stopped while the data was being prepared")
    template = training_template(template_name, default_system)
    out: dict[str, list] = {"input_ids": [], "labels": [], "full_length": [], "dropped": []}
    for turns in encode_many(tokenizer, template, batch["messages"], batch["tools"]):
        row, dropped = _cut(turns, masking)
        out["input_ids"].append(row["input_ids"] if row else [])
        out["labels"].append(row["labels"] if row else [])
        out["full_length"].append(turns.length if turns is not None else 0)
        out["dropped"].append(dropped or "")
    return out


# --- the training data, prepared once ----------------------------------------------------------------------------


@dataclass
class TrainingData:
    train: object  # datasets.Dataset
    eval: object | None
    template: str
    report: list[str]
    lengths: Lengths  # of the training rows, after truncation
    saved_to: Path | None = None  # tokenized_path written: the run stops there, as in LLaMA-Factory
    from_cache: bool = False  # loaded as prepared by an earlier run (or another process of this one)


def build_datasets(cfg: TunerConfig, tokenizer, catalog_template: str | None = None,
                   stop_wait: Callable[[float], bool] | None = None) -> TrainingData:
    """Load, render and tokenize the configured datasets into ``datasets.Dataset`` objects TRL trains on as they are,
    from the cache when the same data was prepared before. With ``stop_wait`` (a run's StopRequest.wait), a stop
    while the data is tokenized ends that within a batch (PreparationStopped), the cache left as it was."""
    d = cfg.data
    # whether this launch prepares tokenized_path (and so stops) is decided before anything is read: every process
    # of a multi-GPU run looks at once, well before the first of them writes it
    prepares = bool(d.tokenized_path) and not (Path(d.tokenized_path).expanduser() / META).is_file()
    loaded = load_conversations(d.dataset, d.dataset_dir, max_samples=d.max_samples, val_size=d.val_size,
                                eval_dataset=d.eval_dataset, seed=cfg.train.seed)
    template = choose_template(cfg, tokenizer, catalog_template)
    warning = template_mismatch(get_template(template), tokenizer) if template != AUTO else None
    if warning:
        log.warning(warning)
    if d.train_on_prompt and get_template(template).efficient_eos:
        raise UserError(f"template {template!r} closes a conversation with one eos (efficient_eos) and so cannot "
                        "train on the prompt, as in LLaMA-Factory",
                        "set train_on_prompt: false or choose another template")
    key = cache_key(loaded.train, loaded.eval, tokenizer, template, d.cutoff_len, d.train_on_prompt,
                    mask_history=d.mask_history, default_system=d.default_system)
    if d.tokenized_path:
        return _tokenized_path(Path(d.tokenized_path).expanduser(), key, loaded, tokenizer, template, cfg, prepares,
                               stop_wait)
    return cached(key, lambda building: _build(building, key, loaded, tokenizer, template, cfg),
                  loaded.report.lines(), d.overwrite_cache, stop_wait)


def cached(key: str, build: Callable[[Path], None], load_report: list[str], overwrite: bool,
           stop_wait: Callable[[float], bool] | None = None) -> TrainingData:
    """The tokenized data of cache entry ``key``: ``build(folder)`` writes it there (its ``train`` and ``eval``
    datasets and META) when it is not there yet, is damaged, or ``overwrite`` (overwrite_cache) asks for it again.
    One process prepares an entry; the others wait for it on its lock. Every stage's data goes through it."""
    entry = cache_dir() / "tokenized" / key
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.with_suffix(".lock")):
        # none yet, or damaged: prepared again; overwrite_cache: by the first process of the machine only, the
        # others load what it wrote
        prepare = (overwrite and local_rank() == 0) or _meta(entry) is None
        if prepare:
            _prepare(entry, build, stop_wait)
        data = _load(entry, load_report)
    data.from_cache = not prepare
    log.info("data: tokenized data %s (%s)", "prepared" if prepare else "loaded from the cache", entry)
    return data


def _tokenized_path(path: Path, key: str, loaded, tokenizer, template: str, cfg: TunerConfig,
                    prepares: bool, stop_wait: Callable[[float], bool] | None = None) -> TrainingData:
    """LLaMA-Factory's ``tokenized_path``: load it when it holds a tokenized dataset; otherwise prepare it there and
    stop (the processes of a multi-GPU run prepare it once: the first to take the lock)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"tokenized_path {path} is a file", "give a directory (new, empty, or prepared before)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make tokenized_path's parent {path.parent}: {exc.strerror}") from None
    with _locked(path.parent / f".{path.name}.lock"):
        if not (path / META).is_file():
            if path.exists() and any(path.iterdir()):
                raise UserError(f"tokenized_path {path} exists but holds no tokenized dataset",
                                "give an empty or new directory, or one a previous run prepared")
            _prepare(path, lambda building: _build(building, key, loaded, tokenizer, template, cfg), stop_wait)
    if _meta(path) is None:
        raise UserError(f"tokenized_path {path} holds a damaged {META}: it is not data tuner prepared, or was cut "
                        "short", "remove the directory, or give a new one, to prepare it again")
    data = _load(path, loaded.report.lines())
    if prepares:
        data.saved_to = path
    elif _meta(path)["key"] != key:
        log.warning("tokenized_path %s was prepared from other data, template, tokenizer or cutoff_len than this "
                    "run's: training on it as it is", path)
    return data


def cache_key(train: list[dict], evaluation: list[dict] | None, tokenizer, template: str, cutoff_len: int,
              train_on_prompt: bool, *, mask_history: bool = False, default_system: str | None = None) -> str:
    """What the tokenized data depends on, hashed: the conversations and their tools (so any source, file or hub,
    and any change to it counts), the template's definition with the default system prompt it is given, the
    tokenizer's vocabulary and specials, the cutoff and the masking."""
    digest = hashlib.blake2b(digest_size=16)
    settings = {"format": CACHE_FORMAT, "template": template,
                "definition": repr(training_template(template, default_system)), "cutoff_len": cutoff_len,
                "train_on_prompt": train_on_prompt, "mask_history": mask_history,
                "tokenizer": tokenizer_digest(tokenizer)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for split in (train, evaluation or []):
        digest.update(b"\x00split")
        rows = [[c["messages"], c.get("tools") or ""] for c in split]
        digest.update(json.dumps(rows, ensure_ascii=False).encode())
    return digest.hexdigest()


def samples_key(kind: str, train: list[dict], evaluation: list[dict] | None, tokenizer, **settings) -> str:
    """A cache key for another stage's data (``kind``: pairs, feedback, text), hashed as cache_key hashes supervised
    data: the samples as loaded (prompts, replies, labels, texts), the tokenizer and ``settings`` (template,
    cutoff_len, ...)."""
    digest = hashlib.blake2b(digest_size=16)
    fixed = {"format": CACHE_FORMAT, "kind": kind, "tokenizer": tokenizer_digest(tokenizer), **settings}
    digest.update(json.dumps(fixed, sort_keys=True, default=str).encode())
    for split in (train, evaluation or []):
        digest.update(b"\x00split")
        digest.update(json.dumps(split, ensure_ascii=False, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps({"class": type(tokenizer).__name__, "special": tokenizer.special_tokens_map,
                        "chat_template": getattr(tokenizer, "chat_template", None)}, sort_keys=True, default=str)
    return hashlib.blake2b((vocab + extra).encode(), digest_size=16).hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` for the ``with`` block; a second process blocks until the first is done."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("data: another process is preparing the same data (%s): waiting for it", path.with_suffix(""))
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def workers_for(count: int, asked: int | None) -> int:
    """``preprocessing_num_workers``, else one process per SAMPLES_PER_WORKER conversations, up to the CPUs."""
    if asked:
        return asked
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1, count // SAMPLES_PER_WORKER))


class PreparationStopped(Exception):
    """A stop came while the data was being prepared: it ended at the next batch, and nothing of it was kept."""


STOP_FLAG = ".stop"  # in the entry being built: made when a stop comes, seen by every tokenizing process


def _prepare(entry: Path, build: Callable[[Path], None], stop_wait: Callable[[float], bool] | None = None) -> None:
    """Tokenize both splits and write them with their report into ``entry`` (``build`` into a folder beside it,
    renamed when whole), whole or not at all: a stop
    (``stop_wait`` answers whether one came, waiting up to its argument in seconds), an error or a full disk leaves
    nothing behind."""
    for stale in entry.parent.glob(f"{entry.name}.building-*"):  # left by a process killed mid-way (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    building = entry.with_name(f"{entry.name}.building-{os.getpid()}")
    try:
        building.mkdir(parents=True)
        with _flagged_on_stop(building / STOP_FLAG, stop_wait):
            build(building)
    except BaseException as exc:
        shutil.rmtree(building, ignore_errors=True)
        if stop_wait is not None and stop_wait(0):
            raise PreparationStopped("stopped while the data was being prepared") from None
        if not isinstance(exc, UserError) and disk_full(exc, entry.parent):
            free = shutil.disk_usage(entry.parent).free / 1024**2
            raise UserError(f"disk full: no space left on the device that holds {entry.parent} ({free:.0f} MiB "
                            "free now) for the tokenized data; what was written of it was removed",
                            "free some space there, or point XDG_CACHE_HOME (or tokenized_path) at a larger disk") \
                from None
        raise
    (building / STOP_FLAG).unlink(missing_ok=True)  # a stop that came as the last batch ended: the data is whole
    if entry.exists():
        shutil.rmtree(entry)
    os.rename(building, entry)


@contextlib.contextmanager
def _flagged_on_stop(flag: Path, stop_wait: Callable[[float], bool] | None):
    """While the body runs, a thread makes ``flag`` as soon as a stop comes: the tokenizing processes (other
    processes, which a signal to this one never reaches) look for it before each batch."""
    if stop_wait is None:
        yield
        return
    import threading

    done = threading.Event()

    def watch():
        while not done.is_set():
            if stop_wait(0.2):
                flag.touch()
                return

    watcher = threading.Thread(target=watch, name="stop-flag", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(1.0)


def _build(building: Path, key: str, loaded, tokenizer, template: str, cfg: TunerConfig) -> None:
    d = cfg.data
    summaries, lengths = [], None
    for split, conversations in (("train", loaded.train), ("eval", loaded.eval)):
        if not conversations:
            continue
        masking = Masking(d.cutoff_len, d.train_on_prompt, d.mask_history)
        dataset, dropped, truncated = _tokenize(conversations, tokenizer, template, d.default_system, masking,
                                                workers_for(len(conversations), d.preprocessing_num_workers),
                                                str(building / STOP_FLAG))
        summaries.append(_summary(split, template, len(dataset), dropped, truncated, d.cutoff_len))
        if split == "train":
            if not len(dataset):
                raise UserError(f"no training sample is left after tokenization ({_drops(dropped)})",
                                "raise cutoff_len or check the dataset's replies")
            lengths = _lengths(dataset)
        if len(dataset):
            dataset.save_to_disk(str(building / split))
    write_meta(building, key, template, summaries, lengths)


def write_meta(folder: Path, key: str, template: str, summaries: list[str], lengths: Lengths) -> None:
    """What a built entry says of itself (``_meta`` reads it back): written last, once its splits are saved."""
    meta = {"key": key, "template": template, "summaries": summaries, "mean_length": lengths.mean,
            "longest": lengths.longest}
    (folder / META).write_text(json.dumps(meta))


_TOKENIZING = False  # while datasets.map forks its workers: what a process forked then is


def _as_a_tokenizing_worker() -> None:
    """In a process forked while the data is tokenized, from the moment it exists: the run's stop handlers it
    inherited go. Else the pool's SIGTERM at the end (or at a stop) reached a handler that only noted a stop, and a
    worker still waiting for its first batch never ended, the pool waiting on it for ever. A worker ends on SIGTERM,
    ignores the Ctrl-C or hangup its process group gets (the run's process handles those, and stops the workers
    through the stop flag), and has no stop of its own."""
    if not _TOKENIZING:
        return
    import signal

    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) not in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(sig, signal.SIG_IGN)


os.register_at_fork(after_in_child=_as_a_tokenizing_worker)


def _tokenize(conversations: list[dict], tokenizer, template: str, default_system: str | None, masking: Masking,
              workers: int, stop_flag: str | None = None):
    from datasets import Dataset

    source = Dataset.from_list([{"messages": c["messages"], "tools": c.get("tools") or ""} for c in conversations])
    encode = functools.partial(_encode_batch, tokenizer=tokenizer, template_name=template,
                               default_system=default_system, masking=masking, stop_flag=stop_flag)
    global _TOKENIZING
    _TOKENIZING = True
    try:
        encoded = source.map(encode, batched=True, batch_size=500, num_proc=workers if workers > 1 else None,
                             remove_columns=source.column_names, desc="tokenizing")
    finally:
        _TOKENIZING = False
    reasons = encoded["dropped"]
    dropped = Counter(reason for reason in reasons if reason)
    truncated = sum(1 for n, reason in zip(encoded["full_length"], reasons) if not reason and n > masking.cutoff_len)
    kept = encoded.select([i for i, reason in enumerate(reasons) if not reason]) if dropped else encoded
    return kept.remove_columns(["full_length", "dropped"]).flatten_indices(), dropped, truncated


def _lengths(dataset) -> Lengths:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.column("input_ids"))
    return Lengths(pc.mean(lengths).as_py(), pc.max(lengths).as_py())


def _meta(entry: Path) -> dict | None:
    """What ``_prepare`` wrote of a prepared entry; None when there is none, or it is damaged (not JSON, not ours)."""
    from engine.rundir.files import read_user_text

    try:
        meta = json.loads(read_user_text(entry / META, "tokenized data's", max_bytes=1 << 20))
    except (UserError, ValueError, RecursionError):
        return None
    fields = {"key": str, "template": str, "summaries": list, "mean_length": (int, float), "longest": int}
    whole = isinstance(meta, dict) and all(isinstance(meta.get(name), kind) for name, kind in fields.items())
    return meta if whole else None


def _load(entry: Path, load_report: list[str]) -> TrainingData:
    from datasets import load_from_disk

    meta = _meta(entry)
    train = load_from_disk(str(entry / "train"))
    evaluation = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return TrainingData(train, evaluation, meta["template"], load_report + meta["summaries"],
                        Lengths(meta["mean_length"], meta["longest"]))


def _summary(split: str, template: str, kept: int, dropped: Counter, truncated: int, cutoff_len: int) -> str:
    text = f"{split}: {kept} samples tokenized with template {template}"
    if truncated:
        text += f"; {truncated} longer than cutoff_len={cutoff_len} were truncated"
    drops = _drops(dropped)
    return text + (f"; {drops}" if drops else "")


def _drops(dropped: Counter) -> str:
    return "; ".join(f"dropped {count} with {reason}" for reason, count in dropped.items())
