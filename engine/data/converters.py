"""Converters from alpaca / sharegpt / openai records to the project's one form of a conversation.

``{"messages": [...], "tools": "<JSON list of function schemas, or '' when none>"}``; a message is
``{"role", "content"}``, where an assistant's tool call is ``{"role": "assistant", "content": "", "tool_calls":
[{"type": "function", "function": {"name": ..., "arguments": "<JSON>"}}]}`` and a tool's result has role "tool".
Only tool calls carry "tool_calls": after an arrow round trip the other messages hold ``None`` there, read as absent.

A sample with an empty prompt or reply is dropped and counted by reason, so the caller can say what was lost;
a sample that is malformed (roles out of order, a missing column) is an error naming the sample.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass

from engine.data.registry import DEFAULT_COLUMNS, DEFAULT_TAGS, DatasetAttr
from engine.errors import UserError

KTO_REJECTED = "kto_tag false (an undesirable reply)"
MEDIA_COLUMNS = ("images", "videos", "audios")
ORDER_HINT = ("after an optional system message, turns alternate user (or a tool's result), assistant (or its "
              "tool call), ... and end with the assistant")
CALL_HINT = ('a function_call turn holds JSON such as {"name": "get_weather", "arguments": {"city": "Paris"}}, '
             "or a list of them")
TOOLS_HINT = 'the tools column holds a JSON list of function schemas such as [{"name": ..., "parameters": ...}]'


@dataclass
class Converted:
    """The conversations kept, and how many samples were dropped for each reason."""

    conversations: list[dict]
    dropped: Counter


def convert(records: list[dict], attr: DatasetAttr, kind: str = "conversations") -> Converted:
    """Every record of one dataset in ``attr.formatting`` as the ``kind`` of sample a stage trains on
    (engine.data.registry.STAGE_KINDS); empty samples dropped and counted:

    - conversations: ``{"messages", "tools"}`` (a kto_tag false sample is dropped: its reply is not to be learned);
    - pairs (a ranking dataset): the prompt's messages and the chosen and rejected replies, ``{"messages", "chosen",
      "rejected", "tools"}``;
    - feedback (a dataset with a kto_tag column): ``{"messages", "tools", "label"}``, the label False where kto_tag
      is false (an undesirable last reply), else True;
    - text (a raw-text dataset): ``{"text"}``.
    """
    to_messages = CONVERTERS.get(attr.formatting)
    if to_messages is None:
        raise UserError(f"dataset '{attr.name}': unknown formatting '{attr.formatting}'",
                        hint=f"valid formattings: {', '.join(CONVERTERS)}")
    _check_supported(attr, kind)
    conversations, dropped = [], Counter()
    for index, record in enumerate(records):
        if kind == "text":
            text = _cell(record, attr, index, "prompt")
            if text.strip():
                conversations.append({"text": text})
            else:
                dropped["empty text"] += 1
            continue
        if kind == "pairs":
            result = pair_messages(record, attr, index)
        elif kind == "conversations" and _kto_rejected(record, attr):
            result = KTO_REJECTED
        else:
            result = to_messages(record, attr, index)
        if isinstance(result, str):
            dropped[result] += 1
        elif kind == "pairs":
            conversations.append({**result, "tools": _tools(record, attr, index)})
        elif kind == "feedback":
            conversations.append({"messages": result, "tools": _tools(record, attr, index),
                                  "label": not _kto_rejected(record, attr)})
        else:
            conversations.append({"messages": result, "tools": _tools(record, attr, index)})
    return Converted(conversations, dropped)


def pair_messages(record: dict, attr: DatasetAttr, index: int) -> dict | str:
    """A ranking record as LLaMA-Factory reads it: the prompt (alpaca's instruction and input, with history and
    system; or sharegpt's / openai's messages, ending with the user's) and the chosen and rejected replies (text, or
    one assistant message each)."""
    replies = {}
    for key in ("chosen", "rejected"):
        value = _column(record, attr.columns[key], attr, index)
        if isinstance(value, dict):
            value = value.get(attr.tags["content_tag"], "")
        replies[key] = _text(value)
        if not replies[key].strip():
            return f"empty {attr.columns[key]}"
    if attr.formatting == "alpaca":
        prompt = "\n".join(t for t in (_cell(record, attr, index, "prompt"), _cell(record, attr, index, "query")) if t)
        if not prompt.strip():
            return f"empty {attr.columns.get('prompt') or attr.columns.get('query')}"
        messages = _system(_cell(record, attr, index, "system"))
        for query, reply in _history(record, attr, index):
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": prompt})
    else:
        with_reply = dict(record)  # the prompt's turns with a placeholder reply, checked as any conversation is
        column = attr.columns.get("messages")
        turns = _column(record, column, attr, index) if column else None
        if isinstance(turns, list):
            placeholder = {attr.tags["role_tag"]: _assistant_tag(attr), attr.tags["content_tag"]: replies["chosen"]}
            with_reply[column] = [*turns, placeholder]
        messages = chat_messages(with_reply, attr, index)
        if isinstance(messages, str):
            return messages
        messages = messages[:-1]
    return {"messages": messages, "chosen": replies["chosen"], "rejected": replies["rejected"]}


def _assistant_tag(attr: DatasetAttr) -> str:
    return attr.tags.get("assistant_tag") or DEFAULT_TAGS[attr.formatting]["assistant_tag"]


def detect_format(attr: DatasetAttr, record: dict) -> DatasetAttr:
    """``attr`` with the formatting and columns that a record's own columns show (for files and hub ids)."""
    first = _first_message(record)
    if first is not None and {"role", "content"} <= set(first):
        formatting, columns = "openai", dict(DEFAULT_COLUMNS["openai"])
    elif "conversations" in record:
        formatting, columns = "sharegpt", {"messages": "conversations"}
    elif first is not None and {"from", "value"} <= set(first):
        formatting, columns = "sharegpt", {"messages": "messages"}
    elif set(record) == {"text"}:  # raw text: a .txt file's lines, or {"text": ...} records
        formatting, columns = "alpaca", {"prompt": "text"}
    elif {"instruction", "output"} <= set(record) or {"instruction", "chosen", "rejected"} <= set(record):
        formatting, columns = "alpaca", dict(DEFAULT_COLUMNS["alpaca"])
        if "history" in record:
            columns["history"] = "history"
    else:
        raise UserError(
            f"cannot tell the format of dataset '{attr.name}' from its columns: {', '.join(map(str, record))}",
            hint="expected instruction/output (alpaca), conversations (sharegpt) or messages with role/content "
                 "(openai), instruction with chosen and rejected (pairs, stages dpo and rm), a kto_tag beside a "
                 "conversation (stage kto) or text alone (stage pt); or "
                 "register it in dataset_info.json with its formatting and columns",
        )
    columns.update({key: key for key in ("system", "tools", "chosen", "rejected", "kto_tag") if key in record})
    return dataclasses.replace(attr, formatting=formatting, columns=columns, tags=dict(DEFAULT_TAGS[formatting]),
                               ranking=attr.ranking or {"chosen", "rejected"} <= set(record))


def alpaca_messages(record: dict, attr: DatasetAttr, index: int) -> list[dict] | str:
    """Instruction and input joined by a newline as the user turn, output as the reply; history turns before them."""
    columns = attr.columns
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
    """Sharegpt (from/value) or openai (role/content) turns, read through ``attr.tags``; a leading system turn kept.

    As in LLaMA-Factory, a tool's result (observation_tag) stands where a user turn may and a tool call
    (function_tag, or an openai assistant message with tool_calls) where an assistant turn may; openai's parallel
    calls may be answered by several tool messages in a row.
    """
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
    system = _cell(record, attr, index, "system")
    start = 0
    if turns and turns[0][tags["role_tag"]] == tags["system_tag"]:
        system, start = _text(turns[0][tags["content_tag"]]), 1
    if len(turns) == start:
        return "no messages"
    messages = []
    for position in range(start, len(turns)):
        here = f"{where}, message {position}"
        message = _turn_message(turns[position], tags, here)
        _check_order(message, messages[-1] if messages else None, turns[position][tags["role_tag"]], attr, here)
        messages.append(message)
    if messages[-1]["role"] != "assistant":
        what = "a user message" if messages[-1]["role"] == "user" else "a tool's result"
        raise UserError(f"{where} ends with {what} (message {len(turns) - 1}); "
                        "a training conversation ends with the assistant's reply", hint=ORDER_HINT)
    if any(not message["content"].strip() for message in messages if not message.get("tool_calls")):
        return "empty message"
    return _system(system) + messages


CONVERTERS = {"alpaca": alpaca_messages, "sharegpt": chat_messages, "openai": chat_messages}


def _turn_message(turn: dict, tags: dict[str, str], where: str) -> dict | None:
    """One turn in the project's form, by its role tag; None for a role that no tag names."""
    role, content = turn[tags["role_tag"]], turn[tags["content_tag"]]
    if role == tags["user_tag"]:
        return {"role": "user", "content": _text(content)}
    if role == tags["observation_tag"]:
        return {"role": "tool", "content": _text(content)}
    if role == tags["function_tag"]:
        return _tool_call_message(_function_calls(content, where), where)
    if role == tags["assistant_tag"]:
        if turn.get("tool_calls"):
            return _tool_call_message([call.get("function") if isinstance(call, dict) else call
                                       for call in turn["tool_calls"]], where, _text(content or ""))
        return {"role": "assistant", "content": _text(content)}
    return None


def _check_order(message: dict | None, previous: dict | None, role: str, attr: DatasetAttr, where: str) -> None:
    """A user turn or a tool's result first and after each reply; a reply or a tool call after each of those.

    Openai's parallel tool calls may be answered by several tool messages in a row.
    """
    if (attr.formatting == "openai" and previous is not None and previous["role"] == "tool"
            and message is not None and message["role"] == "tool"):
        return
    wants_reply = previous is not None and previous["role"] != "assistant"
    if message is not None and (message["role"] == "assistant") == wants_reply:
        return
    first, second = ("assistant", "function") if wants_reply else ("user", "observation")
    raise UserError(f"{where}: role '{role}' where the {first} tag '{attr.tags[first + '_tag']}' or the {second} "
                    f"tag '{attr.tags[second + '_tag']}' was expected", hint=ORDER_HINT)


def _function_calls(value, where: str) -> list:
    """A function_call turn's value: JSON of {"name", "arguments"} or a list of them (parallel calls)."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: the function call is not valid JSON ({err.msg} at column {err.colno})",
                        hint=CALL_HINT) from None
    return calls if isinstance(calls, list) else [calls]


def _tool_call_message(calls: list, where: str, text: str = "") -> dict:
    """An assistant message making ``calls``, each {"name", "arguments"}, with the ``text`` written beside them (an
    openai record's content); arguments that are not text become JSON."""
    if not calls or not all(isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call
                            for call in calls):
        raise UserError(f'{where}: a tool call should have a "name" and "arguments"', hint=CALL_HINT)
    return {"role": "assistant", "content": text, "tool_calls": [
        {"type": "function", "function": {"name": call["name"], "arguments": _json_text(call["arguments"])}}
        for call in calls]}


def _tools(record: dict, attr: DatasetAttr, index: int) -> str:
    """The tools column as a JSON list of function schemas; "" when the sample has none (or an empty list)."""
    column = attr.columns.get("tools")
    value = record.get(column) if column else None
    where = f"dataset '{attr.name}', sample {index}: column '{column}'"
    if isinstance(value, str):
        if not value.strip():
            return ""
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{where} is not valid JSON ({err.msg} at column {err.colno})", hint=TOOLS_HINT) from None
    else:
        value = _without_nulls(value)
    if isinstance(value, dict) and value:
        value = [value]
    if not value:
        return ""
    if not (isinstance(value, list) and all(isinstance(tool, dict) for tool in value)):
        raise UserError(f"{where} should be a list of function schemas", hint=TOOLS_HINT)
    return json.dumps(value, ensure_ascii=False)


def _kto_rejected(record: dict, attr: DatasetAttr) -> bool:
    """LLaMA-Factory's kto_tag false marks an undesirable reply, which supervised training must not learn."""
    column = attr.columns.get("kto_tag")
    value = record.get(column) if column else None
    return value is False or (isinstance(value, str) and value.strip().lower() == "false")


def _json_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _without_nulls(value):
    """Structured tools (from Parquet or the hub) with the nulls arrow fills into keys a schema did not have removed."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _check_supported(attr: DatasetAttr, kind: str = "conversations") -> None:
    """Refuse, from its registry entry alone, a dataset that is not the ``kind`` of text samples the stage trains on
    (conversations with replies; pairs; conversations with a kto_tag; raw text)."""
    if kind == "text":
        if attr.kind != "text":
            raise UserError(f"dataset '{attr.name}' is not raw text: stage pt trains on text alone",
                            hint='a dataset of one text column ("columns": {"prompt": "text"}, as LLaMA-Factory\'s '
                                 'c4_demo), a .jsonl file of {"text": ...} records, or a .txt file')
        return
    pairs = kind == "pairs"
    if attr.ranking and not pairs:
        raise UserError(f"dataset '{attr.name}' is a preference (ranking) dataset for DPO / reward "
                        "modelling",
                        hint="supervised fine-tuning, KTO and prediction take conversations with one reply; set "
                             "stage dpo (or rm, for a reward model) to train on it")
    if pairs and not (attr.ranking and {"chosen", "rejected"} <= set(attr.columns)):
        raise UserError(f"dataset '{attr.name}' is not a preference (ranking) dataset: a pair needs a chosen and a "
                        "rejected reply", hint='register it with "ranking": true and "columns": {..., "chosen": ..., '
                        '"rejected": ...}, or give a file whose records have chosen and rejected')
    if kind == "feedback" and "kto_tag" not in attr.columns:
        raise UserError(f"dataset '{attr.name}' has no kto_tag column: stage kto learns from replies marked "
                        "desirable (true) or not (false)",
                        hint='map the column in dataset_info.json: "columns": {..., "kto_tag": "label"} (as '
                             "LLaMA-Factory's kto_en_demo), or give a file whose records have a kto_tag")
    media = [column for column in MEDIA_COLUMNS if column in attr.columns]
    if media:
        raise UserError(f"dataset '{attr.name}' is multimodal ({', '.join(media)}), which is not supported",
                        hint="use a text-only dataset")
    if attr.formatting == "alpaca" and not pairs:
        _check_alpaca_columns(attr)


def _check_alpaca_columns(attr: DatasetAttr) -> None:
    columns, prompts = attr.columns, {"prompt", "query"} & set(attr.columns)
    mapped = ", ".join(f"{key}={column}" for key, column in columns.items()) or "nothing"
    if "response" not in columns:
        what = ": plain text, for pre-training" if prompts else ""
        raise UserError(f"dataset '{attr.name}' maps no response column (it maps {mapped}){what}"
                        + ("; set stage pt to train on it" if prompts and set(columns) == {"prompt"} else ""),
                        hint='supervised fine-tuning needs a reply per sample: "columns": {"prompt": ..., '
                             '"response": ...}')
    if not prompts:
        raise UserError(f"dataset '{attr.name}' maps no prompt column (it maps {mapped})",
                        hint='an alpaca dataset needs "columns": {"prompt": ..., "response": ...}')


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
