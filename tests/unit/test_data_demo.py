"""The bundled demo datasets: the committed files are the generator's output, and each loads as registered."""

from __future__ import annotations

import re

import pytest

from engine.data import load_conversations
from engine.data.demo_data import write_demo_datasets
from engine.data.registry import BUNDLED_DIR


def test_committed_demo_files_equal_the_generators_output(tmp_path):
    written = write_demo_datasets(tmp_path)
    assert [path.name for path in written] == [
        "demo_alpaca.json", "demo_sharegpt.json", "demo_openai.jsonl", "demo_pairs.json", "demo_feedback.json",
        "dataset_info.json"]
    for path in written:
        assert (BUNDLED_DIR / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"presets/data/{path.name} is stale: run python3 -m engine.data.demo_data")


@pytest.mark.parametrize(("name", "count", "formatting"), [
    ("demo_alpaca", 400, "alpaca"), ("demo_sharegpt", 200, "sharegpt"), ("demo_openai", 200, "openai")])
def test_each_demo_dataset_loads_without_drops(name, count, formatting):
    loaded = load_conversations(name, None)
    report = loaded.report.train[0]
    assert (len(loaded.train), report.formatting, report.dropped) == (count, formatting, {})


def test_sharegpt_demo_is_multi_turn_with_system_prompts():
    for conversation in load_conversations("demo_sharegpt", None).train:
        roles = [message["role"] for message in conversation["messages"]]
        assert roles[0] == "system" and roles[1:] in (["user", "assistant"] * 2, ["user", "assistant"] * 3)


def test_demo_answers_are_short_and_correct():
    for conversation in load_conversations("demo_alpaca", None).train:
        question, answer = (message["content"] for message in conversation["messages"])
        assert len(answer) <= 48
        if match := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
            assert answer == f"{match[1]} + {match[2]} = {int(match[1]) + int(match[2])}."
        if match := re.fullmatch(r"Reverse the word: (\w+)", question):
            assert answer == match[1][::-1]


def test_the_demo_pairs_prefer_the_right_answer_to_a_refusal_or_a_wrong_one():
    pairs = load_conversations("demo_pairs", None, kind="pairs").train
    assert len(pairs) == 300 and all(p["chosen"] != p["rejected"] for p in pairs)
    refusals = sum(p["rejected"] in ("I cannot help with that.", "I don't know.", "Ask someone else.",
                                     "That is not something I answer.") for p in pairs)
    assert 100 < refusals < 200
