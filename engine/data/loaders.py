"""From dataset names to train / eval conversations, with a report of what was read and what was dropped."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from engine.data.converters import convert, detect_format
from engine.data.readers import read_records
from engine.data.registry import resolve_dataset
from engine.errors import UserError

# LLaMA-Factory's placeholder form, as identity.json ships it ({{name}}, {{author}}) for the user to fill in.
PLACEHOLDER = re.compile(r"\{\{([a-zA-Z_][a-zA-Z0-9_]*)\}\}")


@dataclass
class DatasetReport:
    """What one dataset gave: records read (after num_samples / max_samples), conversations kept, drops by reason."""

    name: str
    source: str
    formatting: str
    records: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        drops = "".join(f"; dropped {count} sample{'s' * (count != 1)} with {reason}"
                        for reason, count in self.dropped.items())
        kept = f"{self.kept} conversation{'s' * (self.kept != 1)}"
        return f"{self.name}: {kept} ({self.formatting}, {self.source}){drops}"

    def lines(self, prefix: str = "") -> list[str]:
        """The summary, then each warning on a line of its own naming the dataset."""
        return [prefix + self.summary()] + [f"warning: {prefix}{self.name}: {text}" for text in self.warnings]


@dataclass
class LoadReport:
    """What load_conversations read, for the CLI and the TUI to show."""

    train: list[DatasetReport]
    eval: list[DatasetReport] = field(default_factory=list)
    split: str | None = None

    def lines(self) -> list[str]:
        """One line per dataset (eval ones marked) and its warnings, then the validation split if there was one."""
        lines = [line for report in self.train for line in report.lines()]
        lines += [line for report in self.eval for line in report.lines("eval ")]
        return lines + ([self.split] if self.split else [])


@dataclass
class LoadedData:
    """Conversations as ``{"messages": [...]}``; ``eval`` is None without val_size or eval_dataset."""

    train: list[dict]
    eval: list[dict] | None
    report: LoadReport


def load_conversations(dataset: str, dataset_dir: str | None, *, max_samples: int | None = None,
                       val_size: float | int = 0, eval_dataset: str | None = None, seed: int = 42,
                       kind: str = "conversations") -> LoadedData:
    """Load comma-separated datasets, concatenated; split off ``val_size`` (a fraction or a count) for evaluation.

    ``max_samples`` caps the records read from each dataset, before conversion (as in LLaMA-Factory). ``kind``: the
    samples the stage trains on (engine.data.registry.STAGE_KINDS): conversations; pairs, a prompt with a chosen and a
    rejected reply; feedback, a conversation whose last reply is marked desirable or not; text, ``{"text"}``
    (engine.data.converters.convert).
    """
    if eval_dataset and val_size:
        raise UserError("give either val_size or eval_dataset, not both")
    train, train_reports = _load_many(dataset, dataset_dir, max_samples, seed, kind)
    if eval_dataset:
        evaluation, eval_reports = _load_many(eval_dataset, dataset_dir, max_samples, seed, kind)
        return LoadedData(train, evaluation, LoadReport(train_reports, eval_reports))
    if not val_size:
        return LoadedData(train, None, LoadReport(train_reports))
    train, evaluation = split_eval(train, val_size, seed)
    split = (f"split off {len(evaluation)} of {len(train) + len(evaluation)} for evaluation "
             f"(val_size={val_size}, seed={seed})")
    return LoadedData(train, evaluation, LoadReport(train_reports, split=split))


def split_eval(conversations: list[dict], val_size: float | int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random subset for evaluation (a fraction rounded up, like `datasets`, or a count); order kept."""
    total = len(conversations)
    if 0 < val_size < 1:
        count = math.ceil(val_size * total)
    elif val_size >= 1 and val_size == int(val_size):
        count = int(val_size)
    else:
        raise UserError(f"val_size={val_size} is neither a fraction between 0 and 1 nor a whole count")
    if count >= total:
        raise UserError(f"val_size={val_size} takes {count} of {total} conversations for evaluation, "
                        "leaving none to train on")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    return ([c for i, c in enumerate(conversations) if i not in held_out],
            [c for i, c in enumerate(conversations) if i in held_out])


def _load_many(names: str, dataset_dir: str | None, max_samples: int | None,
               seed: int, kind: str = "conversations") -> tuple[list[dict], list[DatasetReport]]:
    conversations, reports = [], []
    for name in (part.strip() for part in names.split(",")):
        if not name:
            raise UserError(f"empty dataset name in '{names}'", hint="separate dataset names with single commas")
        loaded, report = load_dataset_conversations(name, dataset_dir, max_samples, seed, kind)
        conversations += loaded
        reports.append(report)
    return conversations, reports


def load_dataset_conversations(name: str, dataset_dir: str | None, max_samples: int | None = None,
                               seed: int = 42, kind: str = "conversations") -> tuple[list[dict], DatasetReport]:
    """One dataset's conversations; an empty dataset, or one where every sample was dropped, is an error."""
    attr = resolve_dataset(name, dataset_dir)
    records = read_records(attr)
    if not records:
        raise UserError(f"dataset '{name}' is empty ({attr.location})")
    if attr.num_samples is not None:
        records = _sample(records, attr.num_samples, seed)
    if max_samples is not None:
        records = records[:max_samples]
    if attr.formatting is None:
        attr = detect_format(attr, records[0])
    converted = convert(records, attr, kind)
    if not converted.conversations:
        reasons = ", ".join(f"{count} with {reason}" for reason, count in converted.dropped.items())
        raise UserError(f"dataset '{name}' has no usable samples: all {len(records)} were dropped ({reasons})")
    report = DatasetReport(name, attr.location, attr.formatting, len(records), len(converted.conversations),
                           dict(converted.dropped), _placeholder_warnings(converted.conversations, attr.location))
    return converted.conversations, report


def _placeholder_warnings(conversations: list[dict], location: str) -> list[str]:
    """One warning naming the {{placeholders}} left in a dataset's messages and how many conversations hold them."""
    names, holding = Counter(), 0
    for conversation in conversations:
        texts = [message["content"] for message in conversation["messages"]] if "messages" in conversation else \
            [conversation["text"]]
        found = {match for text in texts for match in PLACEHOLDER.findall(text)}
        holding += bool(found)
        names.update(found)
    if not holding:
        return []
    listed = ", ".join("{{" + name + "}}" for name, _ in names.most_common())
    return [f"{holding} of {len(conversations)} conversations hold the placeholders {listed}: replace them in "
            f"{location} with your own text before training"]


def _sample(records: list[dict], num_samples: int, seed: int) -> list[dict]:
    """LLaMA-Factory's ``num_samples``: a seeded permutation, topped up by drawing with replacement when larger."""
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    order = order[:num_samples] + [rng.randrange(len(records)) for _ in range(num_samples - len(records))]
    return [records[i] for i in order]
