"""Tool calling in SFT data as LLaMA-Factory reads it (sharegpt function_call / observation turns, a tools column,
openai tool_calls), converted to the agreed form; and kto_tag false samples dropped."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from llamafactory_layout import MIRRORED

from engine.data import convert, detect_format, load_conversations
from engine.data.converters import KTO_REJECTED
from engine.data.registry import DEFAULT_TAGS, DatasetAttr
from engine.errors import UserError


# Written by hand in the shape of LLaMA-Factory's data/glaive_toolcall_en_demo.json: sharegpt turns, and a
# "tools" column holding a JSON string of function schemas ("[]" where the sample has none).
AREA = {"name": "calculate_area", "description": "Calculate the area of a given shape",
        "parameters": {"type": "object", "properties": {
            "shape": {"type": "string", "description": "The shape for which to calculate the area"},
            "dimensions": {"type": "array", "items": {"type": "number"},
                           "description": "The dimensions required to calculate the area"}},
            "required": ["shape", "dimensions"]}}
DISCOUNT = {"name": "calculate_discount", "description": "Calculate the discounted price",
            "parameters": {"type": "object", "properties": {"original_price": {"type": "number"},
                                                            "discount_percentage": {"type": "number"}},
                           "required": ["original_price", "discount_percentage"]}}
GLAIVE = [
    {"conversations": [{"from": "human", "value": "Write a definition of \"photoshop\"."},
                       {"from": "gpt", "value": "Photoshop is an image editor made by Adobe."}],
     "tools": "[]"},
    {"conversations": [
        {"from": "human", "value": "I need the area of a rectangle. The length is 5 units and the breadth is 3."},
        {"from": "function_call",
         "value": "{\"name\": \"calculate_area\", \"arguments\": {\"shape\": \"rectangle\", \"dimensions\": [5, 3]}}"},
        {"from": "observation", "value": "{\"area\": 15}"},
        {"from": "gpt", "value": "The area of the rectangle is 15 square units."},
        {"from": "human", "value": "What about a circle with a radius of 4 units?"},
        {"from": "function_call",
         "value": "{\"name\": \"calculate_area\", \"arguments\": {\"shape\": \"circle\", \"dimensions\": [4]}}"},
        {"from": "observation", "value": "{\"area\": 50.24}"},
        {"from": "gpt", "value": "The area of the circle is approximately 50.24 square units."}],
     "tools": json.dumps([AREA, DISCOUNT])},
]


def call(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def calling(*calls: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": list(calls)}


def text(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def attr(formatting: str, columns: dict, tags: dict | None = None) -> DatasetAttr:
    return DatasetAttr(name="t", load_from="file", location="/x", formatting=formatting, columns=columns,
                       tags={**DEFAULT_TAGS[formatting], **(tags or {})})


SHAREGPT_TOOLS = attr("sharegpt", {"messages": "conversations", "tools": "tools"})
OPENAI_TOOLS = attr("openai", {"messages": "messages", "tools": "tools"})


def test_glaive_toolcall_file_through_llamafactorys_registry_entry(tmp_path):
    entry = MIRRORED["glaive_toolcall_en_demo"]
    (tmp_path / "dataset_info.json").write_text(json.dumps({"glaive_toolcall_en_demo": entry}))
    (tmp_path / entry["file_name"]).write_text(json.dumps(GLAIVE, indent=2, ensure_ascii=False))
    loaded = load_conversations("glaive_toolcall_en_demo", str(tmp_path))
    assert loaded.train == [
        {"messages": [text("user", "Write a definition of \"photoshop\"."),
                      text("assistant", "Photoshop is an image editor made by Adobe.")], "tools": ""},
        {"messages": [
            text("user", "I need the area of a rectangle. The length is 5 units and the breadth is 3."),
            calling(call("calculate_area", '{"shape": "rectangle", "dimensions": [5, 3]}')),
            text("tool", '{"area": 15}'),
            text("assistant", "The area of the rectangle is 15 square units."),
            text("user", "What about a circle with a radius of 4 units?"),
            calling(call("calculate_area", '{"shape": "circle", "dimensions": [4]}')),
            text("tool", '{"area": 50.24}'),
            text("assistant", "The area of the circle is approximately 50.24 square units.")],
         "tools": json.dumps([AREA, DISCOUNT])},
    ]
    assert loaded.report.train[0].dropped == {}


def test_a_list_of_calls_is_parallel_calls_and_arguments_given_as_text_are_kept():
    value = json.dumps([{"name": "weather", "arguments": {"city": "Paris"}},
                        {"name": "weather", "arguments": '{"city": "Rome"}'}])
    record = {"conversations": [{"from": "human", "value": "Paris and Rome?"},
                                {"from": "function_call", "value": value},
                                {"from": "observation", "value": "sunny; rain"},
                                {"from": "gpt", "value": "Sun, rain."}]}
    assert convert([record], SHAREGPT_TOOLS).conversations == [{"messages": [
        text("user", "Paris and Rome?"),
        calling(call("weather", '{"city": "Paris"}'), call("weather", '{"city": "Rome"}')),
        text("tool", "sunny; rain"), text("assistant", "Sun, rain.")], "tools": ""}]


def test_function_and_observation_tags_come_from_the_registry_entry():
    tags = {"function_tag": "tool_use", "observation_tag": "tool_result"}
    record = {"conversations": [{"from": "human", "value": "q"},
                                {"from": "tool_use", "value": '{"name": "f", "arguments": {}}'},
                                {"from": "tool_result", "value": "r"}, {"from": "gpt", "value": "a"}]}
    assert convert([record], attr("sharegpt", {"messages": "conversations"}, tags)).conversations[0]["messages"] == [
        text("user", "q"), calling(call("f", "{}")), text("tool", "r"), text("assistant", "a")]


def test_a_conversation_may_end_with_a_tool_call():
    record = {"conversations": [{"from": "human", "value": "q"},
                                {"from": "function_call", "value": '{"name": "f", "arguments": {"x": "é"}}'}]}
    assert convert([record], SHAREGPT_TOOLS).conversations[0]["messages"] == [
        text("user", "q"), calling(call("f", '{"x": "é"}'))]


@pytest.mark.parametrize(("value", "message"), [
    ("not json", "dataset 't', sample 0, message 1: the function call is not valid JSON "
                 "(Expecting value at column 1)"),
    ('{"arguments": {}}', "dataset 't', sample 0, message 1: a tool call should have a \"name\" and \"arguments\""),
    ('{"name": "f"}', "dataset 't', sample 0, message 1: a tool call should have a \"name\" and \"arguments\""),
    ("[]", "dataset 't', sample 0, message 1: a tool call should have a \"name\" and \"arguments\""),
])
def test_malformed_function_call_names_sample_and_message(value, message):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": value},
                                {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(UserError) as err:
        convert([record], SHAREGPT_TOOLS)
    assert err.value.message == message
    assert "function_call turn holds JSON" in err.value.hint


@pytest.mark.parametrize(("roles", "message"), [
    (["human", "observation", "gpt"], "dataset 't', sample 0, message 1: role 'observation' where the assistant tag "
                                      "'gpt' or the function tag 'function_call' was expected"),
    (["function_call", "observation", "gpt"], "dataset 't', sample 0, message 0: role 'function_call' where the "
                                              "user tag 'human' or the observation tag 'observation' was expected"),
    (["human", "function_call", "observation", "observation", "gpt"],
     "dataset 't', sample 0, message 3: role 'observation' where the assistant tag 'gpt' or the function tag "
     "'function_call' was expected"),
])
def test_tool_turns_out_of_order_name_sample_and_position(roles, message):
    values = {"human": "q", "gpt": "a", "observation": "r", "function_call": '{"name": "f", "arguments": {}}'}
    record = {"conversations": [{"from": role, "value": values[role]} for role in roles]}
    with pytest.raises(UserError) as err:
        convert([record], SHAREGPT_TOOLS)
    assert err.value.message == message
    assert "tool" in err.value.hint


def test_ending_with_a_tool_result_is_an_error_naming_the_sample():
    record = {"conversations": [{"from": "human", "value": "q"},
                                {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                                {"from": "observation", "value": "r"}]}
    with pytest.raises(UserError) as err:
        convert([record], SHAREGPT_TOOLS)
    assert err.value.message.startswith("dataset 't', sample 0 ends with a tool's result (message 2)")


def test_openai_tool_calls_and_tool_messages_as_they_come():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    record = {"messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "a2", "type": "function", "function": {"name": "weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "a1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "a2", "content": "rain"},
        {"role": "assistant", "content": "Sun in Paris, rain in Rome."}], "tools": tools}
    assert convert([record], OPENAI_TOOLS).conversations == [{"messages": [
        text("system", "Use tools."), text("user", "Paris and Rome?"),
        calling(call("weather", '{"city": "Paris"}'), call("weather", '{"city": "Rome"}')),
        text("tool", "sunny"), text("tool", "rain"), text("assistant", "Sun in Paris, rain in Rome.")],
        "tools": json.dumps(tools)}]


def test_openai_text_beside_tool_calls_is_kept_in_front_of_them():
    record = {"messages": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    message = convert([record], OPENAI_TOOLS).conversations[0]["messages"][1]
    assert message["content"] == "Let me check." and message["tool_calls"][0]["function"]["name"] == "weather"


def test_sharegpt_observations_in_a_row_are_out_of_order_as_in_llamafactory():
    record = {"conversations": [{"from": "human", "value": "q"},
                                {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                                {"from": "observation", "value": "r"}, {"from": "observation", "value": "s"},
                                {"from": "gpt", "value": "a"}]}
    with pytest.raises(UserError, match="message 3: role 'observation' where the assistant tag"):
        convert([record], SHAREGPT_TOOLS)


def test_alpaca_tools_column_is_carried_with_the_conversation():
    columns = {"prompt": "instruction", "query": "input", "response": "output", "tools": "tools"}
    record = {"instruction": "Which tool finds the weather?", "output": "weather", "tools": json.dumps([AREA])}
    assert convert([record], attr("alpaca", columns)).conversations == [{"messages": [
        text("user", "Which tool finds the weather?"), text("assistant", "weather")], "tools": json.dumps([AREA])}]


@pytest.mark.parametrize(("tools", "expected"), [
    (None, ""), ("", ""), ("[]", ""), ([], ""), ({}, ""),
    ('[{"name": "f"}]', '[{"name": "f"}]'), ({"name": "f"}, '[{"name": "f"}]'),
    ('[{"name": "météo"}]', '[{"name": "météo"}]'),
    ([{"name": "f", "description": None}], '[{"name": "f"}]'),
])
def test_tools_column_becomes_a_json_list_or_empty_text(tools, expected):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": tools}
    assert convert([record], SHAREGPT_TOOLS).conversations[0]["tools"] == expected


@pytest.mark.parametrize(("tools", "message"), [
    ("[{", "dataset 't', sample 0: column 'tools' is not valid JSON (Expecting property name enclosed in double "
           "quotes at column 3)"),
    ('["f"]', "dataset 't', sample 0: column 'tools' should be a list of function schemas"),
    ("3", "dataset 't', sample 0: column 'tools' should be a list of function schemas"),
])
def test_malformed_tools_column_names_the_sample(tools, message):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": tools}
    with pytest.raises(UserError) as err:
        convert([record], SHAREGPT_TOOLS)
    assert err.value.message == message


def test_every_conversation_carries_tools_and_only_tool_calls_carry_tool_calls():
    records = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, GLAIVE[1]]
    conversations = convert(records, SHAREGPT_TOOLS).conversations
    assert [sorted(conversation) for conversation in conversations] == [["messages", "tools"]] * 2
    assert [sorted(message) for message in conversations[1]["messages"][:3]] == [
        ["content", "role"], ["content", "role", "tool_calls"], ["content", "role"]]


def test_arrow_fills_missing_tool_calls_with_none_and_reading_back_treats_it_as_absent():
    from datasets import Dataset

    records = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, GLAIVE[1]]
    conversations = convert(records, SHAREGPT_TOOLS).conversations
    rows = Dataset.from_list(conversations).to_list()
    assert rows[0]["messages"][0] == {"role": "user", "content": "q", "tool_calls": None}
    assert rows[0]["tools"] == ""
    assert convert(rows, OPENAI_TOOLS).conversations == conversations


def test_detect_format_maps_a_tools_column():
    detected = detect_format(attr("sharegpt", {}), GLAIVE[0])
    assert (detected.formatting, detected.columns) == ("sharegpt", {"messages": "conversations", "tools": "tools"})


KTO = [
    {"messages": [{"content": "Which is the best summary?", "role": "user"},
                  {"content": "D! Science/Tech!", "role": "assistant"}], "label": True},
    {"messages": [{"content": "How would you find customers?", "role": "user"},
                  {"content": "Shout at strangers.", "role": "assistant"}], "label": False},
    {"messages": [{"content": "Name a colour.", "role": "user"}, {"content": "Blue.", "role": "assistant"}],
     "label": False},
]


def test_kto_tag_false_samples_are_dropped_and_counted_through_llamafactorys_registry_entry(tmp_path):
    entry = MIRRORED["kto_en_demo"]
    (tmp_path / "dataset_info.json").write_text(json.dumps({"kto_en_demo": entry}))
    (tmp_path / entry["file_name"]).write_text(json.dumps(KTO, indent=2))
    loaded = load_conversations("kto_en_demo", str(tmp_path))
    assert loaded.train == [{"messages": [text("user", "Which is the best summary?"),
                                          text("assistant", "D! Science/Tech!")], "tools": ""}]
    assert loaded.report.train[0].dropped == {KTO_REJECTED: 2}
    assert loaded.report.lines()[0].endswith("; dropped 2 samples with kto_tag false (an undesirable reply)")


def test_kto_tag_in_alpaca_and_as_csv_text():
    columns = {"prompt": "prompt", "response": "completion", "kto_tag": "label"}
    records = [{"prompt": "a", "completion": "b", "label": "False"},
               {"prompt": "c", "completion": "d", "label": "true"},
               {"prompt": "e", "completion": "f", "label": None}, {"prompt": "g", "completion": "h"}]
    result = convert(records, attr("alpaca", columns))
    assert [c["messages"][0]["content"] for c in result.conversations] == ["c", "e", "g"]
    assert result.dropped == Counter({KTO_REJECTED: 1})
