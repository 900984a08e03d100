"""Converters from alpaca / sharegpt / openai records to the project's one form, ``{"messages": [...]}``.

A sample with an empty prompt or reply is dropped and counted by reason, so the caller can say what was lost;
a sample that is malformed (roles out of order, a missing column) is an error naming the sample.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from engine.data.registry import DEFAULT_COLUMNS, DEFAULT_TAGS, DatasetAttr
from engine.errors import UserError

TOOL_TURNS = "tool-call turns (not supported)"
MEDIA_COLUMNS = ("images", "videos", "audios")
ORDER_HINT = "after an optional system message, turns alternate user, assistant, ... and end with the assistant"


@dataclass
class Converted:
    """The conversations kept, and how many samples were dropped for each reason."""

    conversations: list[dict]
    dropped: Counter


def convert(records: list[dict], attr: DatasetAttr) -> Converted:
    """Every record of one dataset in ``attr.formatting`` as a conversation; empty samples dropped and counted."""
    to_messages = CONVERTERS.get(attr.formatting)
    if to_messages is None:
        raise UserError(f"dataset '{attr.name}': unknown formatting '{attr.formatting}'",
                        hint=f"valid formattings: {', '.join(CONVERTERS)}")
    _check_supported(attr)
    conversations, dropped = [], Counter()
    for index, record in enumerate(records):
        result = to_messages(record, attr, index)
        if isinstance(result, str):
            dropped[result] += 1
        else:
            conversations.append({"messages": result})
    return Converted(conversations, dropped)


def detect_format(attr: DatasetAttr, record: dict) -> DatasetAttr:
    """``attr`` with the formatting and columns that a record's own columns show (for files and hub ids)."""
    first = _first_message(record)
    if first is not None and {"role", "content"} <= set(first):
        formatting, columns = "openai", dict(DEFAULT_COLUMNS["openai"])
    elif "conversations" in record:
        formatting, columns = "sharegpt", {"messages": "conversations"}
    elif first is not None and {"from", "value"} <= set(first):
        formatting, columns = "sharegpt", {"messages": "messages"}
    elif {"instruction", "output"} <= set(record):
        formatting, columns = "alpaca", dict(DEFAULT_COLUMNS["alpaca"])
        if "history" in record:
            columns["history"] = "history"
    else:
        raise UserError(
            f"cannot tell the format of dataset '{attr.name}' from its columns: {', '.join(map(str, record))}",
            hint="expected instruction/output (alpaca), conversations (sharegpt) or messages with role/content "
                 "(openai); or register it in dataset_info.json with its formatting and columns",
        )
    if "system" in record:
        columns["system"] = "system"
    return dataclasses.replace(attr, formatting=formatting, columns=columns, tags=dict(DEFAULT_TAGS[formatting]))


def alpaca_messages(record: dict, attr: DatasetAttr, index: int) -> list[dict] | str:
    """Instruction and input joined by a newline as the user turn, output as the reply; history turns before them."""
    columns = attr.columns
    if "response" not in columns or not ({"prompt", "query"} & set(columns)):
        raise UserError(f"dataset '{attr.name}' maps no prompt/response columns (it maps: {columns})",
                        hint='an alpaca dataset needs "columns": {"prompt": ..., "response": ...}')
    prompt_column = columns.get("prompt") or columns["query"]
    prompt = "\n".join(text for text in (_cell(record, attr, index, "prompt"), _cell(record, attr, index, "query"))
                       if text)
    response = _cell(record, attr, index, "response")
    if not prompt.strip():
        return f"empty {prompt_column}"
    if not response.strip():
        return f"empty {columns['response']}"
    messages = _system(_cell(record, attr, index, "system"))
    for query, reply in _history(record, attr, index):
        if not (query.strip() and reply.strip()):
            return "empty history turn"
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def chat_messages(record: dict, attr: DatasetAttr, index: int) -> list[dict] | str:
    """Sharegpt (from/value) or openai (role/content) turns, read through ``attr.tags``; a leading system turn kept."""
    tags, where = attr.tags, f"dataset '{attr.name}', sample {index}"
    column = attr.columns.get("messages")
    if column is None:
        raise UserError(f"dataset '{attr.name}' maps no messages column",
                        hint='a sharegpt/openai dataset needs "columns": {"messages": ...}')
    turns = _column(record, column, attr, index)
    if not isinstance(turns, list):
        raise UserError(f"{where}: column '{column}' should be a list of messages, not {type(turns).__name__}")
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or tags["role_tag"] not in turn or tags["content_tag"] not in turn:
            keys = ", ".join(turn) if isinstance(turn, dict) else type(turn).__name__
            raise UserError(f"{where}, message {position}: expected '{tags['role_tag']}' and "
                            f"'{tags['content_tag']}' keys, found: {keys}",
                            hint="set the dataset's role_tag / content_tag in dataset_info.json")
    roles = [turn[tags["role_tag"]] for turn in turns]
    if any(role in (tags["observation_tag"], tags["function_tag"]) or turn.get("tool_calls")
           for role, turn in zip(roles, turns)):
        return TOOL_TURNS
    system = _cell(record, attr, index, "system")
    start = 0
    if roles and roles[0] == tags["system_tag"]:
        system, start = _text(turns[0][tags["content_tag"]]), 1
    expected = [("user", tags["user_tag"]), ("assistant", tags["assistant_tag"])]
    messages = _system(system)
    for position in range(start, len(turns)):
        role, tag = expected[(position - start) % 2]
        if roles[position] != tag:
            raise UserError(f"{where}, message {position}: role '{roles[position]}' where the {role} tag "
                            f"'{tag}' was expected", hint=ORDER_HINT)
        messages.append({"role": role, "content": _text(turns[position][tags["content_tag"]])})
    if len(turns) == start:
        return "no messages"
    if messages[-1]["role"] == "user":
        raise UserError(f"{where} ends with a user message (message {len(turns) - 1}); "
                        "a training conversation ends with the assistant's reply", hint=ORDER_HINT)
    if any(not message["content"].strip() for message in messages if message["role"] != "system"):
        return "empty message"
    return messages


CONVERTERS = {"alpaca": alpaca_messages, "sharegpt": chat_messages, "openai": chat_messages}


def _check_supported(attr: DatasetAttr) -> None:
    if attr.ranking:
        raise UserError(f"dataset '{attr.name}' is a preference (ranking) dataset for DPO / reward modelling",
                        hint="supervised fine-tuning needs conversations with one reply")
    media = [column for column in MEDIA_COLUMNS if column in attr.columns]
    if media:
        raise UserError(f"dataset '{attr.name}' is multimodal ({', '.join(media)}), which is not supported",
                        hint="use a text-only dataset")


def _first_message(record: dict) -> dict | None:
    messages = record.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return messages[0]
    return None


def _column(record: dict, column: str, attr: DatasetAttr, index: int):
    if column not in record:
        raise UserError(f"dataset '{attr.name}' has no column '{column}' (sample {index} has: "
                        f"{', '.join(map(str, record))})",
                        hint="map its columns in dataset_info.json, e.g. \"columns\": {\"prompt\": ..., ...}")
    return record[column]


def _cell(record: dict, attr: DatasetAttr, index: int, key: str) -> str:
    """The text of a mapped column; the prompt and response columns must exist, the others may be absent."""
    column = attr.columns.get(key)
    if column is None or (key in ("query", "system") and column not in record):
        return ""
    return _text(_column(record, column, attr, index))


def _history(record: dict, attr: DatasetAttr, index: int) -> list[tuple[str, str]]:
    column = attr.columns.get("history")
    history = record.get(column) if column else None
    if not history:
        return []
    if not (isinstance(history, list) and all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in history)):
        raise UserError(f"dataset '{attr.name}', sample {index}: column '{column}' should be a list of "
                        "[query, response] pairs")
    return [(_text(query), _text(reply)) for query, reply in history]


def _system(text: str) -> list[dict]:
    return [{"role": "system", "content": text}] if text.strip() else []


def _text(value) -> str:
    """A cell as text: None is empty; a list of OpenAI content parts is joined."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "".join(part.get("text", "") for part in value if isinstance(part, dict))
    return str(value)
