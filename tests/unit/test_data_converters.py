"""Exact conversions from alpaca / sharegpt / openai records to {"messages": [...]}, and what gets dropped."""

from __future__ import annotations

from collections import Counter

import pytest

from engine.data.converters import convert, detect_format
from engine.data.registry import DEFAULT_TAGS, DatasetAttr
from engine.errors import UserError


def attr(formatting: str | None = "alpaca", columns: dict | None = None, tags: dict | None = None) -> DatasetAttr:
    base = DatasetAttr(name="t", load_from="file", location="/x", formatting=formatting)
    if columns is not None:
        base.columns = columns
    if formatting in DEFAULT_TAGS:
        base.tags = {**DEFAULT_TAGS[formatting], **(tags or {})}
    return base


def messages(*pairs: tuple[str, str], tools: str = "") -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs], "tools": tools}


ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system"}


def test_alpaca_joins_instruction_and_input_and_puts_system_and_history_first():
    record = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be terse.",
              "history": [["Hi", "Hello"], ["Ready?", "Yes"]]}
    result = convert([record], attr(columns=ALPACA_COLUMNS))
    assert result.conversations == [messages(
        ("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Ready?"), ("assistant", "Yes"),
        ("user", "Translate\nchat"), ("assistant", "cat"))]
    assert result.dropped == Counter()


def test_alpaca_without_input_or_system_columns_gives_one_exchange():
    result = convert([{"instruction": "Say hi", "output": "hi"}], attr())
    assert result.conversations == [messages(("user", "Say hi"), ("assistant", "hi"))]


def test_alpaca_drops_and_counts_empty_outputs_and_instructions():
    records = [{"instruction": "a", "input": "", "output": ""}, {"instruction": "b", "input": "", "output": "  "},
               {"instruction": "", "input": "", "output": "x"}, {"instruction": "c", "input": "", "output": "d"},
               {"instruction": "e", "output": "f", "history": [["", "g"]]}]
    result = convert(records, attr(columns=ALPACA_COLUMNS))
    assert result.conversations == [messages(("user", "c"), ("assistant", "d"))]
    assert result.dropped == Counter({"empty output": 2, "empty instruction": 1, "empty history turn": 1})


def test_alpaca_with_mapped_columns_reads_them():
    columns = {"prompt": "question", "response": "answer", "system": "system_prompt"}
    record = {"question": "2+2?", "answer": "4", "system_prompt": "Math.", "input": "ignored"}
    assert convert([record], attr(columns=columns)).conversations == [
        messages(("system", "Math."), ("user", "2+2?"), ("assistant", "4"))]


def test_alpaca_missing_response_column_lists_the_columns_that_exist():
    with pytest.raises(UserError) as err:
        convert([{"instruction": "a", "answer": "b"}], attr())
    assert err.value.message == "dataset 't' has no column 'output' (sample 0 has: instruction, answer)"


def test_alpaca_history_that_is_not_pairs_names_the_sample():
    record = {"instruction": "a", "output": "b", "history": ["just text"]}
    with pytest.raises(UserError, match=r"sample 0: column 'history' should be a list of \[query, response\] pairs"):
        convert([record], attr(columns=ALPACA_COLUMNS))


def test_sharegpt_default_tags_with_system_turn():
    record = {"conversations": [
        {"from": "system", "value": "You add."}, {"from": "human", "value": "1+1"}, {"from": "gpt", "value": "2"},
        {"from": "human", "value": "2+2"}, {"from": "gpt", "value": "4"}]}
    assert convert([record], attr("sharegpt", {"messages": "conversations"})).conversations == [messages(
        ("system", "You add."), ("user", "1+1"), ("assistant", "2"), ("user", "2+2"), ("assistant", "4"))]


def test_sharegpt_custom_tags_and_system_column():
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    record = {"dialog": [{"speaker": "me", "text": "ping"}, {"speaker": "bot", "text": "pong"}], "sys": "Echo."}
    result = convert([record], attr("sharegpt", {"messages": "dialog", "system": "sys"}, tags))
    assert result.conversations == [messages(("system", "Echo."), ("user", "ping"), ("assistant", "pong"))]


def test_sharegpt_role_out_of_order_names_sample_and_position():
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    bad = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "gpt", "value": "c"}, {"from": "human", "value": "d"}]}
    with pytest.raises(UserError) as err:
        convert([good, bad], attr("sharegpt", {"messages": "conversations"}))
    assert err.value.message == ("dataset 't', sample 1, message 2: "
                                 "role 'gpt' where the user tag 'human' or the observation tag 'observation' was "
                                 "expected")


def test_sharegpt_ending_with_user_is_an_error_naming_the_sample():
    record = {"conversations": [{"from": "human", "value": "a"}]}
    with pytest.raises(UserError) as err:
        convert([record], attr("sharegpt", {"messages": "conversations"}))
    assert err.value.message.startswith("dataset 't', sample 0 ends with a user message (message 0)")


def test_sharegpt_wrong_tags_list_the_keys_found():
    record = {"conversations": [{"role": "user", "content": "a"}]}
    with pytest.raises(UserError) as err:
        convert([record], attr("sharegpt", {"messages": "conversations"}))
    assert err.value.message == ("dataset 't', sample 0, message 0: "
                                 "expected 'from' and 'value' keys, found: role, content")


def test_sharegpt_drops_empty_turns():
    records = [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": '{"name": "f", '
                           '"arguments": {}}'}, {"from": "observation", "value": " "}, {"from": "gpt", "value": "b"}]},
        {"conversations": []},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    ]
    result = convert(records, attr("sharegpt", {"messages": "conversations"}))
    assert result.conversations == [messages(("user", "a"), ("assistant", "b"))]
    assert result.dropped == Counter({"empty message": 2, "no messages": 1})


def test_openai_messages_with_system_and_content_parts():
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": parts},
                           {"role": "assistant", "content": "Hi"}]}
    assert convert([record], attr("openai", {"messages": "messages"})).conversations == [
        messages(("system", "S"), ("user", "Hello there"), ("assistant", "Hi"))]


def test_openai_honours_custom_tags():
    tags = {"user_tag": "human", "assistant_tag": "model", "system_tag": "developer"}
    record = {"chat": [{"role": "developer", "content": "D"}, {"role": "human", "content": "q"},
                       {"role": "model", "content": "a"}]}
    assert convert([record], attr("openai", {"messages": "chat"}, tags)).conversations == [
        messages(("system", "D"), ("user", "q"), ("assistant", "a"))]


def test_unknown_formatting_lists_the_valid_ones():
    with pytest.raises(UserError) as err:
        convert([{"a": 1}], attr("chatml"))
    assert err.value.message == "dataset 't': unknown formatting 'chatml'"
    assert err.value.hint == "valid formattings: alpaca, sharegpt, openai"


def test_ranking_and_multimodal_datasets_are_refused():
    ranking = attr("sharegpt", {"messages": "conversations", "chosen": "chosen"})
    ranking.ranking = True
    with pytest.raises(UserError, match="preference"):
        convert([], ranking)
    with pytest.raises(UserError, match=r"multimodal \(images\), which is not supported"):
        convert([], attr("sharegpt", {"messages": "messages", "images": "images"}))


@pytest.mark.parametrize(("record", "formatting", "columns"), [
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca",
     {"prompt": "instruction", "query": "input", "response": "output"}),
    ({"instruction": "a", "output": "b", "system": "s", "history": []}, "alpaca",
     {"prompt": "instruction", "query": "input", "response": "output", "history": "history", "system": "system"}),
    ({"conversations": [{"from": "human", "value": "a"}], "system": "s"}, "sharegpt",
     {"messages": "conversations", "system": "system"}),
    ({"messages": [{"from": "human", "value": "a"}]}, "sharegpt", {"messages": "messages"}),
    ({"messages": [{"role": "user", "content": "a"}]}, "openai", {"messages": "messages"}),
])
def test_detect_format_from_columns(record, formatting, columns):
    detected = detect_format(attr(None), record)
    assert (detected.formatting, detected.columns) == (formatting, columns)
    assert detected.tags == DEFAULT_TAGS[formatting]


def test_detect_format_of_unknown_columns_says_what_is_expected():
    with pytest.raises(UserError) as err:
        detect_format(attr(None), {"body": "x", "id": 1})  # {"text": ...} alone is raw text, stage pt's
    assert err.value.message == "cannot tell the format of dataset 't' from its columns: body, id"
    assert "instruction/output (alpaca)" in err.value.hint
