"""cutoff_len as LLaMA-Factory's supervised processor applies it (infer_seqlen per (prompt, reply) pair, last turn
first under mask_history), and the data options that shape the tokenized rows: train_on_prompt, mask_history,
default_system, tools; all of them in the cache key."""

from __future__ import annotations

import json

import pytest

from engine.data.tokenize import cache_key, encode_conversations, training_template
from engine.errors import UserError
from engine.templates import IGNORE_INDEX as X
from engine.templates import EncodedTurns, get_template, infer_seqlen, render_segments, render_text

PAIRS = [([1, 2, 3], [4, 5]), ([6, 7], [8, 9, 10])]


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        ((3000, 2000, 1000), (600, 400)),
        ((2000, 3000, 1000), (400, 600)),
        ((1000, 100, 1000), (900, 100)),
        ((100, 1000, 1000), (100, 900)),
        ((100, 500, 1000), (100, 500)),
        ((500, 100, 1000), (500, 100)),
        ((10, 10, 1000), (10, 10)),
    ],
)
def test_infer_seqlen_shares_the_budget_as_llama_factory(lengths, expected):
    assert infer_seqlen(*lengths) == expected


def test_without_a_cutoff_every_reply_is_learned_and_nothing_else():
    sample = EncodedTurns(PAIRS).sample()
    assert sample.input_ids == list(range(1, 11))
    assert sample.labels == [X, X, X, 4, 5, X, X, 8, 9, 10]


def test_each_turn_gets_its_share_of_what_is_left_and_the_rest_is_dropped():
    sample = EncodedTurns(PAIRS).sample(6)
    assert sample.input_ids == [1, 2, 3, 4, 5, 6]  # turn 2 gets one token: its prompt's first
    assert sample.labels == [X, X, X, 4, 5, X]
    assert EncodedTurns(PAIRS).sample(5).input_ids == [1, 2, 3, 4, 5]  # budget used: turn 2 is not started


def test_a_reply_that_starts_beyond_the_cutoff_is_kept_with_its_end():
    long_prompt = EncodedTurns([(list(range(1, 11)), [11, 12])])
    sample = long_prompt.sample(6)
    assert sample.input_ids == [1, 2, 3, 4, 11, 12]  # the prompt is cut, the short reply and its eos stay whole
    assert sample.labels == [X, X, X, X, 11, 12]


def test_a_reply_longer_than_its_share_loses_its_end_as_in_llama_factory():
    long_reply = EncodedTurns([([1, 2], list(range(3, 13)))])
    assert long_reply.sample(6).input_ids == [1, 2, 3, 4, 5, 6]  # target_ids[:target_len]: the eos is cut


def test_mask_history_learns_the_last_reply_and_cuts_from_the_first_turn():
    assert EncodedTurns(PAIRS).sample(mask_history=True).labels == [X, X, X, X, X, X, X, 8, 9, 10]
    sample = EncodedTurns(PAIRS).sample(6, mask_history=True)
    assert sample.input_ids == [1, 6, 7, 8, 9, 10]  # the last turn is whole, the first keeps one token
    assert sample.labels == [X, X, X, 8, 9, 10]


def test_train_on_prompt_learns_every_token():
    sample = EncodedTurns(PAIRS).sample(6, train_on_prompt=True)
    assert sample.labels == sample.input_ids == [1, 2, 3, 4, 5, 6]
    assert EncodedTurns(PAIRS).sample(mask_history=True, train_on_prompt=True).labels == [1, 2, 3, X, X, 6, 7, 8, 9, 10]


def test_efficient_eos_closes_the_conversation_and_labels_the_token_after_each_earlier_reply():
    sample = EncodedTurns(PAIRS, eos_id=99).sample()
    assert sample.input_ids == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99]
    assert sample.labels == [X, X, X, 4, 5, 99, X, 8, 9, 10, 99]
    assert EncodedTurns(PAIRS, eos_id=99).sample(6).input_ids == [1, 2, 3, 4, 5, 99]  # one token kept for eos
    with pytest.raises(UserError, match="cannot train on the prompt"):
        EncodedTurns(PAIRS, eos_id=99).sample(train_on_prompt=True)


# --- through the data layer, on the demo tokenizer -----------------------------------------------------------------

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Name a colour. " * 8}, {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, of course."}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["tiny-llama"])


def learned_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != X])


def test_truncated_samples_are_counted_and_kept(demo_tokenizer):
    full = encode_conversations(CONVERSATIONS, demo_tokenizer, "chatml", 10_000)
    first = full.lengths[0]
    cut = encode_conversations(CONVERSATIONS, demo_tokenizer, "chatml", first - 5)
    assert (full.truncated, cut.truncated) == (0, 1)
    assert not cut.dropped and len(cut.rows) == 2
    assert len(cut.rows[0]["input_ids"]) == first - 5 and cut.lengths == full.lengths
    prompt = len(demo_tokenizer.encode(render_text(get_template("chatml"), CONVERSATIONS[0]["messages"][:1],
                                                   demo_tokenizer, add_generation_prompt=True),
                                       add_special_tokens=False))
    tiny = encode_conversations(CONVERSATIONS[:1], demo_tokenizer, "chatml", prompt - 2)  # the old rule dropped it
    assert tiny.rows and any(label != X for label in tiny.rows[0]["labels"])


def test_mask_history_learns_only_the_last_reply(demo_tokenizer):
    rows = encode_conversations(CONVERSATIONS, demo_tokenizer, "chatml", 10_000, mask_history=True).rows
    assert learned_text(demo_tokenizer, rows[0]) == "Green, of course.<|im_end|>\n"
    assert learned_text(demo_tokenizer, rows[1]) == "Hello!<|im_end|>\n"


def test_default_system_replaces_the_templates_own(demo_tokenizer):
    rows = encode_conversations(CONVERSATIONS[1:], demo_tokenizer, "qwen", 10_000, default_system="Be kind.").rows
    text = demo_tokenizer.decode(rows[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi")
    assert training_template("qwen", "Be kind.").default_system == "Be kind."
    assert training_template("qwen").default_system == get_template("qwen").default_system


def test_tools_are_rendered_into_the_rows(demo_tokenizer):
    tools = json.dumps([{"name": "paint", "description": "Paint", "parameters": {"type": "object", "properties": {}}}])
    with_tools = encode_conversations([dict(CONVERSATIONS[1], tools=tools)], demo_tokenizer, "qwen", 10_000).rows
    assert '"name": "paint"' in demo_tokenizer.decode(with_tools[0]["input_ids"])


def test_the_cache_key_changes_with_every_option_that_changes_the_rows(demo_tokenizer):
    def key(conversations=CONVERSATIONS, **options):
        return cache_key(conversations, None, demo_tokenizer, "qwen", 64, False, **options)

    keys = [
        key(),
        key(mask_history=True),
        key(default_system="Be kind."),
        key([dict(CONVERSATIONS[0], tools='[{"name": "paint"}]'), CONVERSATIONS[1]]),
        cache_key(CONVERSATIONS, None, demo_tokenizer, "qwen", 64, True),
    ]
    assert len(set(keys)) == len(keys)
    assert key() == key(default_system=None)


def test_the_prepared_dataset_applies_every_option_and_counts_truncation(demo_tokenizer):
    """The datasets.map path training takes (tools as a column, default_system and masking applied per batch)."""
    from engine.data.tokenize import Masking, _tokenize

    tools = json.dumps([{"name": "paint", "description": "Paint", "parameters": {"type": "object", "properties": {}}}])
    conversations = [CONVERSATIONS[0], dict(CONVERSATIONS[1], tools=tools)]
    alone = encode_conversations(conversations, demo_tokenizer, "qwen", 40, mask_history=True, default_system="Be kind.")
    dataset, dropped, truncated = _tokenize(conversations, demo_tokenizer, "qwen", "Be kind.",
                                            Masking(40, mask_history=True), workers=1)
    assert [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset] == alone.rows
    assert (not dropped, truncated) == (True, alone.truncated) and truncated >= 1
    assert learned_text(demo_tokenizer, alone.rows[0]) == "Green, of course.<|im_end|>\n"
    assert "Be kind." in demo_tokenizer.decode(alone.rows[1]["input_ids"])


def test_default_system_reaches_the_tokenizers_own_chat_template(demo_tokenizer):
    rows = encode_conversations(CONVERSATIONS[1:], demo_tokenizer, "auto", 10_000, default_system="Be kind.").rows
    plain = encode_conversations(CONVERSATIONS[1:], demo_tokenizer, "auto", 10_000).rows
    assert "Be kind." in demo_tokenizer.decode(rows[0]["input_ids"])
    assert "Be kind." not in demo_tokenizer.decode(plain[0]["input_ids"])


def llama_factory_rows(tokenizer, pairs: list[tuple[str, str]], cutoff_len: int, mask_history: bool):
    """SupervisedDatasetProcessor._encode_data_example, as LLaMA-Factory writes it, on (prompt, reply) texts."""
    encoded = [(tokenizer.encode(s, add_special_tokens=False), tokenizer.encode(t, add_special_tokens=False))
               for s, t in pairs]
    if mask_history:
        encoded = encoded[::-1]
    input_ids, labels, total_length = [], [], 0
    for turn_idx, (source_ids, target_ids) in enumerate(encoded):
        if total_length >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source_ids), len(target_ids), cutoff_len - total_length)
        source_ids, target_ids = source_ids[:source_len], target_ids[:target_len]
        total_length += source_len + target_len
        source_label = [X] * source_len
        target_label = [X] * target_len if mask_history and turn_idx != 0 else target_ids
        if mask_history:
            input_ids, labels = source_ids + target_ids + input_ids, source_label + target_label + labels
        else:
            input_ids, labels = input_ids + source_ids + target_ids, labels + source_label + target_label
    return {"input_ids": input_ids, "labels": labels}


def pairs_of(records: list[dict]) -> list[dict]:
    """Two alpaca records make one two-turn conversation."""
    return [{"messages": [{"role": "user", "content": a["instruction"]}, {"role": "assistant", "content": a["output"]},
                          {"role": "user", "content": b["instruction"]}, {"role": "assistant", "content": b["output"]}]}
            for a, b in zip(records[0::2], records[1::2])]


def assert_cut_as_llama_factory_cuts(conversations: list[dict], tokenizer, mask_history: bool) -> None:
    encoded = encode_conversations(conversations, tokenizer, "qwen", 48, mask_history=mask_history)
    template = get_template("qwen")
    for conversation, row in zip(conversations, encoded.rows):
        segments = render_segments(template, conversation["messages"], tokenizer)
        pairs = [(segments[i].text, segments[i + 1].text) for i in range(0, len(segments), 2)]
        assert row == llama_factory_rows(tokenizer, pairs, 48, mask_history)
    assert encoded.truncated == sum(n > 48 for n in encoded.lengths) > 0 and not encoded.dropped


@pytest.mark.parametrize("mask_history", [False, True])
def test_identity_style_data_tokenizes_as_llama_factory_cuts_it(demo_tokenizer, mask_history):
    from llamafactory_layout import IDENTITY  # LLaMA-Factory's own identity.json: tests/shared

    assert_cut_as_llama_factory_cuts(pairs_of(IDENTITY), demo_tokenizer, mask_history)