"""Tool calling: a glaive-style conversation rendered in each tool format exactly as LLaMA-Factory renders it
(expected strings written from its tool_utils.py and template.py), the calls learned, the results not."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from engine.errors import UserError
from engine.templates import IGNORE_INDEX, encode, get_template, render_segments, render_text


WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "The city"}},
        "required": ["location"],
    },
}
TOOLS = json.dumps([WEATHER])
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}
GLAIVE = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temperature": 22}'},
    {"role": "assistant", "content": "It is 22 degrees in Paris."},
]
WEATHER_JSON = (
    '{"name": "get_weather", "description": "Get the current weather", "parameters": {"type": "object", '
    '"properties": {"location": {"type": "string", "description": "The city"}}, "required": ["location"]}}'
)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "[INST]", "[/INST]"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["What is the weather in Paris? It is 22 degrees."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def pieces(template_name, tok, messages=GLAIVE, tools=TOOLS):
    return [(s.text, s.learned) for s in render_segments(get_template(template_name), messages, tok, tools=tools)]


def test_qwen_renders_tools_calls_and_results_as_llama_factory(tok):
    system = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": ' + WEATHER_JSON + "}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
    )
    assert pieces("qwen", tok) == [
        (system + "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call><|im_end|>\n', True),
        ('<|im_start|>user\n<tool_response>\n{"temperature": 22}\n</tool_response><|im_end|>\n'
         "<|im_start|>assistant\n", False),
        ("It is 22 degrees in Paris.<|im_end|>\n", True),
    ]  # fmt: skip


def test_llama3_renders_tools_calls_and_results_as_llama_factory(tok):
    wrapped = json.dumps({"type": "function", "function": WEATHER}, indent=4)
    system = (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {datetime.now().strftime('%d %b %Y')}\n\n"
        "You have access to the following functions. To call a function, please respond with JSON for a function "
        'call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
        'value}. Do not use variables.\n\n' + wrapped + "\n\n<|eot_id|>"
    )
    assert pieces("llama3", tok) == [
        ("<s>" + system + "<|start_header_id|>user<|end_header_id|>\n\nWhat is the weather in Paris?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ('{"name": "get_weather", "parameters": {"location": "Paris"}}<|eot_id|>', True),
        ('<|start_header_id|>ipython<|end_header_id|>\n\n{"temperature": 22}<|eot_id|>'
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("It is 22 degrees in Paris.<|eot_id|>", True),
    ]  # fmt: skip


MISTRAL_TOOLS = '[AVAILABLE_TOOLS] [{"type": "function", "function": ' + WEATHER_JSON + "}][/AVAILABLE_TOOLS]"


def test_mistral_small_renders_tools_calls_and_results_as_llama_factory(tok):
    assert pieces("mistral_small", tok) == [
        ("<s>[SYSTEM_PROMPT]" + MISTRAL_TOOLS + "[/SYSTEM_PROMPT][INST]What is the weather in Paris?[/INST]", False),
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"location": "Paris"}}]</s>', True),
        ('[TOOL_RESULTS]{"content": {"temperature": 22}}[/TOOL_RESULTS]', False),
        ("It is 22 degrees in Paris.</s>", True),
    ]


def test_mistral_renders_tools_as_llama_factory_but_for_mistrals_space_before_inst_close(tok):
    assert pieces("mistral", tok) == [
        ("<s>[INST] " + MISTRAL_TOOLS + "\n\nWhat is the weather in Paris? [/INST]", False),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"location": "Paris"}}]</s>', True),
        ('[TOOL_RESULTS] {"content": {"temperature": 22}}[/TOOL_RESULTS]', False),
        (" It is 22 degrees in Paris.</s>", True),
    ]


def test_default_renders_tools_calls_and_results_as_llama_factory(tok):
    system = (
        "System: You have access to the following tools:\n> Tool Name: get_weather\n"
        "Tool Description: Get the current weather\nTool Args:\n  - location (string, required): The city\n\n"
        "Use the following format if using a tool:\n```\nAction: tool name (one of [get_weather])\n"
        "Action Input: the input to the tool, in a JSON format representing the kwargs "
        '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n</s>\n'
    )
    assert pieces("default", tok) == [
        (system + "Human: What is the weather in Paris?</s>\nAssistant:", False),
        ('Action: get_weather\nAction Input: {"location": "Paris"}</s>\n', True),
        ('Human: {"temperature": 22}</s>\nAssistant:', False),
        ("It is 22 degrees in Paris.</s>\n", True),
    ]


def test_glm4_writes_one_call_as_name_and_arguments_and_refuses_parallel_calls(tok):
    assert ("get_weather\n{\"location\": \"Paris\"}", True) in pieces("glm4", tok)
    parallel = [GLAIVE[0], {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]}]
    with pytest.raises(UserError, match="one function per reply"):
        render_text(get_template("glm4"), parallel, tok, tools=TOOLS)


ROME = {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Rome"}}}
PARALLEL = [  # two calls in one reply, each answered by a tool message of its own
    GLAIVE[0],
    {"role": "assistant", "content": "Checking both.", "tool_calls": [CALL, ROME]},
    {"role": "tool", "content": "22"},
    {"role": "tool", "content": "25"},
    {"role": "assistant", "content": "22 and 25."},
]


def test_parallel_results_share_one_observation_as_qwens_template_writes_them(tok):
    messages = PARALLEL
    got = pieces("qwen", tok, messages)
    assert got[1] == (
        'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Rome"}}\n</tool_call><|im_end|>\n', True
    )
    assert got[2] == (
        "<|im_start|>user\n<tool_response>\n22\n</tool_response>\n<tool_response>\n25\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n", False
    )
    # templates whose own format answers each call in a turn of its own keep one turn per result
    assert pieces("llama3", tok, messages)[2][0].count("<|start_header_id|>ipython") == 2


def test_the_tool_call_is_learned_and_the_tool_result_is_not(tok):
    sample = encode(tok, get_template("qwen"), GLAIVE, tools=TOOLS)
    learned = tok.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])
    assert learned == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call><|im_end|>\n'
        "It is 22 degrees in Paris.<|im_end|>\n"
    )
    assert "temperature" not in learned


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([GLAIVE[0], GLAIVE[2]], "message 2 of 2 has role 'tool' where 'assistant' was expected"),
        ([GLAIVE[0], GLAIVE[3], GLAIVE[2]], "message 3 of 3 has role 'tool' where 'user' was expected"),
        ([GLAIVE[0], GLAIVE[1], GLAIVE[3]], "message 3 of 3 has role 'assistant' where 'tool' was expected"),
        ([GLAIVE[0], {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
         "message 2 of 2 has a tool call without a function name and JSON object arguments"),
    ],
)  # fmt: skip
def test_tool_messages_out_of_place_are_named(tok, messages, message):
    with pytest.raises(UserError) as error:
        render_segments(get_template("qwen"), messages, tok, tools=TOOLS)
    assert error.value.message == message


def test_tools_that_are_not_a_json_list_are_a_user_error(tok):
    with pytest.raises(UserError, match="not a JSON list"):
        render_text(get_template("qwen"), GLAIVE, tok, tools="{not json")
