"""Tool calling through a published chat template (Qwen2.5's file): `auto` hands it tools and messages as they are,
and it writes parallel results as our qwen template does."""

from __future__ import annotations

import json

from test_tool_calling import GLAIVE, PARALLEL, TOOLS, WEATHER, pieces, tok

from engine.templates import encode, get_template, render_segments

__all__ = ["tok"]  # the unit suite's tiny tokenizer fixture, used here as it is


def test_parallel_results_share_one_observation_in_qwens_published_file(shared_data, tok):
    messages = PARALLEL
    tok.chat_template = (shared_data / "chat_templates" / "qwen2.5-instruct.jinja").read_text()
    wrapped = json.dumps([{"type": "function", "function": WEATHER}])
    assert pieces("auto", tok, messages, wrapped)[2] == pieces("qwen", tok, messages)[2]


def test_auto_passes_tools_and_messages_as_they_are_to_the_chat_template(shared_data, tok):
    tok.chat_template = (shared_data / "chat_templates" / "qwen2.5-instruct.jinja").read_text()
    as_dicts = [dict(m, tool_calls=[{"type": "function", "function": {"name": "get_weather",
                                                                      "arguments": {"location": "Paris"}}}])
                if m.get("tool_calls") else m for m in GLAIVE]  # Qwen's file wants the arguments as an object
    wrapped = json.dumps([{"type": "function", "function": WEATHER}])  # Qwen's file writes the schemas as given
    assert render_segments(get_template("auto"), as_dicts, tok, tools=wrapped) == render_segments(
        get_template("qwen"), GLAIVE, tok, tools=TOOLS)
    assert encode(tok, get_template("auto"), as_dicts, tools=wrapped) == encode(tok, get_template("qwen"), GLAIVE,
                                                                                   tools=TOOLS)
    # arguments held as JSON text (as the data layer stores them) reach the chat template as an object, once encoded
    assert render_segments(get_template("auto"), GLAIVE, tok, tools=wrapped) == render_segments(
        get_template("auto"), as_dicts, tok, tools=wrapped)
