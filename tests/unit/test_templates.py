"""Prompt templates: exact renders, label masks, auto, chat_template export, errors (against the published chat
templates: tests/shared)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from engine.errors import UserError
from engine.templates import (
    IGNORE_INDEX,
    NoLearnedTokens,
    Segment,
    describe_templates,
    encode,
    encode_many,
    get_template,
    render_segments,
    render_text,
    template_mismatch,
    template_names,
    to_chat_template,
)

NAMED = [name for name in template_names() if name != "auto"]
SPECIAL_TOKENS = [
    "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
    "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>",
]  # fmt: skip

SYSTEM = {"role": "system", "content": "Be brief."}
ONE_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
TWO_TURNS = ONE_TURN + [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
PADDED = [{"role": "user", "content": "  Hi\n"}, {"role": "assistant", "content": " Hello! "}]
CONVERSATIONS = {
    "one turn": ONE_TURN,
    "two turns": TWO_TURNS,
    "system, one turn": [SYSTEM, *ONE_TURN],
    "system, two turns": [SYSTEM, *TWO_TURNS],
    "padded text": PADDED,
}

@pytest.fixture(scope="module")
def trained_tokenizer():
    """A byte-level BPE trained in milliseconds, with every template's markers as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["Hello! Hi, be brief. What is 2+2? It is 4. You are a helpful assistant."], trainer)
    return tokenizer


@pytest.fixture
def tok(trained_tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=trained_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture
def bare_tok(trained_tokenizer):
    """The same vocabulary with no bos or eos token declared: templates fall back to their own literals."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=trained_tokenizer, unk_token="<unk>")


def with_default_system(template, conversation):
    if template.default_system is None or conversation[0]["role"] == "system":
        return conversation
    return [{"role": "system", "content": template.default_system}, *conversation]


def hf_render(tokenizer, chat_template: str, messages, add_generation_prompt=False) -> str:
    tokenizer.chat_template = chat_template
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def learned_texts(tokenizer, sample) -> list[str]:
    """The decoded runs of consecutive labels that are learned."""
    runs = itertools.groupby(sample.labels, key=lambda label: label != IGNORE_INDEX)
    return [tokenizer.decode(list(run), clean_up_tokenization_spaces=False) for learned, run in runs if learned]


# --- the registry -----------------------------------------------------------------------------------------------


def test_template_names_are_the_shipped_set_with_auto():
    assert template_names() == [
        "auto", "alpaca", "llama2", "mistral", "ministral", "ministral3", "mistral_small", "llama3", "skywork_o1",
        "openchat-3.6", "llama4", "chatml", "qwen", "qwen3", "qwen3_nothink", "yi", "intern2", "phi", "phi_small",
        "phi4", "gemma", "gemma2", "gemma3", "deepseek", "deepseek3", "glm4", "chatglm3", "baichuan2", "cohere",
        "falcon", "olmo", "solar", "openchat", "vicuna", "zephyr", "default", "empty",
    ]  # fmt: skip


def test_unknown_template_lists_known_names_closest_first():
    with pytest.raises(UserError) as error:
        get_template("lama2")
    assert error.value.message == "unknown template 'lama2'"
    assert error.value.hint.startswith("did you mean 'llama2'? known templates: llama2, ")
    assert all(name in error.value.hint for name in template_names())


def test_describe_templates_gives_a_one_line_example_per_template():
    rows = {name: (description, example) for name, description, example in describe_templates()}
    assert list(rows) == template_names()
    assert all(description and "\n" not in description + example for description, example in rows.values())
    assert rows["llama2"][1] == "<s>[INST] Hi [/INST] Hello! </s>"
    assert rows["chatml"][1] == "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n"


def test_qwen_carries_its_published_default_system_prompt_and_stop_word():
    qwen = get_template("qwen")
    assert qwen.default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert qwen.stop_words == ("<|im_end|>",)


# --- exact renderings -------------------------------------------------------------------------------------------


def test_llama2_is_the_official_per_turn_format(tok):
    assert render_text(get_template("llama2"), [SYSTEM, *TWO_TURNS], tok) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] What is 2+2? [/INST] It is 4. </s>"
    )


def test_mistral_puts_the_system_prompt_inside_the_first_inst(tok):
    assert render_text(get_template("mistral"), [SYSTEM, *TWO_TURNS], tok) == (
        "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] What is 2+2? [/INST] It is 4.</s>"
    )


def test_chatml_generation_prompt_opens_an_assistant_turn(tok):
    assert render_text(get_template("chatml"), [SYSTEM, ONE_TURN[0]], tok, add_generation_prompt=True) == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_default_and_empty_render_exact_strings(tok):
    # Changed on purpose: `default` and `empty` are LLaMA-Factory's (eos after every turn, no space after
    # "Assistant:"; `empty` adds nothing, not even eos), so a LLaMA-Factory config naming them trains the same text.
    assert render_text(get_template("default"), [SYSTEM, *TWO_TURNS], tok) == (
        "System: Be brief.</s>\nHuman: Hi</s>\nAssistant:Hello!</s>\nHuman: What is 2+2?</s>\nAssistant:It is 4.</s>\n"
    )
    assert render_text(get_template("default"), TWO_TURNS[:3], tok, add_generation_prompt=True) == (
        "Human: Hi</s>\nAssistant:Hello!</s>\nHuman: What is 2+2?</s>\nAssistant:"
    )
    assert render_text(get_template("empty"), [SYSTEM, *PADDED], tok) == "Be brief.  Hi\n Hello! "


def test_missing_bos_and_eos_fall_back_to_the_templates_literals(bare_tok):
    assert render_text(get_template("llama2"), ONE_TURN, bare_tok) == "<s>[INST] Hi [/INST] Hello! </s>"
    assert render_text(get_template("gemma"), ONE_TURN, bare_tok).startswith("<bos><start_of_turn>user\n")
    assert render_text(get_template("chatml"), ONE_TURN, bare_tok).startswith("<|im_start|>user\n")


def test_segments_mark_the_replies_and_what_follows_them_as_learned(tok):
    # Changed on purpose: the newline after a reply's end token is learned, as LLaMA-Factory learns it.
    assert render_segments(get_template("vicuna"), [SYSTEM, *TWO_TURNS], tok) == [
        Segment("<s>Be brief.\n\nUSER: Hi\nASSISTANT:", False),
        Segment(" Hello!</s>\n", True),
        Segment("USER: What is 2+2?\nASSISTANT:", False),
        Segment(" It is 4.</s>\n", True),
    ]


# --- token ids and labels ---------------------------------------------------------------------------------------

# Changed on purpose: the whitespace after a reply's end token is learned too (LLaMA-Factory's format_assistant).
LEARNED = {
    "alpaca": ["Hello!</s>\n\n", "It is 4.</s>\n\n"],
    "llama2": [" Hello! </s>", " It is 4. </s>"],
    "mistral": [" Hello!</s>", " It is 4.</s>"],
    "llama3": ["Hello!<|eot_id|>", "It is 4.<|eot_id|>"],
    "chatml": ["Hello!<|im_end|>\n", "It is 4.<|im_end|>\n"],
    "qwen": ["Hello!<|im_end|>\n", "It is 4.<|im_end|>\n"],
    "qwen3": ["<think>\n\n</think>\n\nHello!<|im_end|>\n", "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"],
    "vicuna": [" Hello!</s>\n", " It is 4.</s>\n"],
    "zephyr": ["Hello!</s>\n", "It is 4.</s>\n"],
    "gemma": ["Hello!<end_of_turn>\n", "It is 4.<end_of_turn>\n"],
    # efficient_eos: the token after an earlier reply is labelled eos, and one eos ends the conversation
    "gemma2": ["Hello!<end_of_turn>\n</s>", "It is 4.<end_of_turn>\n</s>"],
    "glm4": ["\nHello!</s>", "\nIt is 4.</s>"],
    "chatglm3": ["\nHello!</s>", "\nIt is 4.</s>"],
    "baichuan2": ["Hello!</s>", "It is 4.</s>"],
    "falcon": ["Hello!\n</s>", "It is 4.\n</s>"],
    "solar": ["Hello!</s>", "It is 4.</s>"],
    "default": ["Hello!</s>\n", "It is 4.</s>\n"],
    "empty": ["Hello!", "It is 4."],
}


@pytest.mark.parametrize("name", NAMED)
def test_learned_tokens_are_exactly_the_replies_and_their_end_tokens(tok, name):
    template = get_template(name)
    sample = encode(tok, template, [SYSTEM, *TWO_TURNS])
    assert len(sample.input_ids) == len(sample.labels)
    for position, (token, label) in enumerate(zip(sample.input_ids, sample.labels)):
        # efficient_eos: the token after an earlier reply is labelled eos, so the model learns to stop there
        assert label in (token, IGNORE_INDEX) or (template.efficient_eos and label == tok.eos_token_id), position
    expected = LEARNED.get(name) or [render_segments(template, [SYSTEM, *TWO_TURNS], tok)[i].text for i in (1, 3)]
    assert learned_texts(tok, sample) == expected
    assert tok.decode(sample.input_ids, clean_up_tokenization_spaces=False) == render_text(
        get_template(name), [SYSTEM, *TWO_TURNS], tok
    )


@pytest.mark.parametrize("name", [*NAMED, "auto"])
def test_the_batch_encoder_gives_what_encode_gives(tok, name):
    """Training tokenizes through encode_many (one Rust batch call for every segment); the preview through encode."""
    tok.chat_template = to_chat_template(get_template("chatml"))
    conversations = list(CONVERSATIONS.values()) + [TWO_TURNS[:1]]
    batch = encode_many(tok, get_template(name), conversations)
    for conversation, turns in zip(conversations[:-1], batch):
        alone = encode(tok, get_template(name), conversation)
        assert turns.sample() == alone
        assert turns.length == len(alone.input_ids)
    assert batch[-1] is None  # nothing to learn


def test_special_tokens_in_the_text_become_single_ids(tok):
    sample = encode(tok, get_template("llama2"), TWO_TURNS)
    bos, inst = tok.convert_tokens_to_ids("<s>"), tok.convert_tokens_to_ids("[INST]")
    assert sample.input_ids[:2] == [bos, inst]
    assert sample.input_ids.count(bos) == 2 and sample.input_ids.count(inst) == 2
    chatml = encode(tok, get_template("chatml"), [SYSTEM, *TWO_TURNS])
    assert chatml.input_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5
    assert chatml.labels.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2


def test_a_cutoff_shorter_than_the_prompt_still_learns_the_start_of_the_reply(tok):
    # Changed on purpose: LLaMA-Factory's infer_seqlen shares cutoff_len between prompt and reply, so a reply that
    # starts beyond cutoff_len is cut with its prompt instead of dropping the sample (tests/unit/test_truncation.py).
    full = encode(tok, get_template("chatml"), TWO_TURNS)
    first_reply = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = encode(tok, get_template("chatml"), TWO_TURNS, cutoff_len=first_reply)
    assert len(cut.input_ids) == first_reply
    assert any(label != IGNORE_INDEX for label in cut.labels)
    with pytest.raises(NoLearnedTokens, match="no assistant reply"):
        encode(tok, get_template("chatml"), TWO_TURNS[:1])


# --- auto: the tokenizer's own chat_template --------------------------------------------------------------------


@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
@pytest.mark.parametrize("name", NAMED)
def test_auto_masks_match_the_named_template_on_a_tokenizer_carrying_it(tok, name, conversation):
    tok.chat_template = to_chat_template(get_template(name))
    if get_template(name).efficient_eos and len(conversation) > 3:
        # one eos closes the whole conversation, so a reply renders differently alone and inside it
        with pytest.raises(UserError, match="replies cannot be located"):
            encode(tok, get_template("auto"), conversation)
        return
    assert encode(tok, get_template("auto"), conversation) == encode(tok, get_template(name), conversation)


@pytest.mark.parametrize("name", ["llama2", "chatml", "alpaca", "llama3", "qwen", "vicuna", "zephyr"])
def test_auto_masks_match_with_the_templates_own_chat_template(tok, name):
    tok.chat_template = to_chat_template(get_template(name))
    conversation = [SYSTEM, *TWO_TURNS]
    assert encode(tok, get_template("auto"), conversation) == encode(tok, get_template(name), conversation)


def test_auto_without_a_chat_template_asks_for_a_named_one(tok):
    with pytest.raises(UserError, match="this tokenizer has none") as error:
        render_text(get_template("auto"), ONE_TURN, tok)
    assert "llama2" in error.value.hint


# --- to_chat_template -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
@pytest.mark.parametrize("name", NAMED)
def test_generated_chat_template_renders_like_the_template(tok, bare_tok, name, conversation):
    template, jinja = get_template(name), to_chat_template(get_template(name))
    prompt = conversation[:-1]
    for tokenizer in (tok, bare_tok):
        assert hf_render(tokenizer, jinja, conversation) == render_text(template, conversation, tokenizer)
        assert hf_render(tokenizer, jinja, prompt, True) == render_text(
            template, prompt, tokenizer, add_generation_prompt=True
        )


def test_generated_chat_template_escapes_jinja_syntax_in_literals(tok):
    odd = dataclasses.replace(get_template("default"), user="{% raw %} {{ '}}' }} %}: {{content}}\n")
    assert hf_render(tok, to_chat_template(odd), ONE_TURN) == render_text(odd, ONE_TURN, tok)
    assert render_text(odd, ONE_TURN, tok).startswith("{% raw %} {{ '}}' }} %}: Hi\n")


def test_placeholders_inside_message_text_stay_text(tok):
    conversation = [{"role": "user", "content": "say {{eos_token}}"}, {"role": "assistant", "content": "{{content}}"}]
    assert render_text(get_template("chatml"), conversation, tok) == (
        "<s><|im_start|>user\nsay {{eos_token}}<|im_end|>\n<|im_start|>assistant\n{{content}}<|im_end|>\n"
    )


def test_generated_chat_template_rejects_bad_role_order(tok):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="roles must alternate"):
        hf_render(tok, to_chat_template(get_template("chatml")), list(reversed(ONE_TURN)))


def test_auto_has_no_chat_template_of_its_own():
    with pytest.raises(UserError, match="tokenizer's chat_template"):
        to_chat_template(get_template("auto"))


# --- template_mismatch ------------------------------------------------------------------------------------------


def test_mismatch_is_none_when_the_tokenizer_agrees_or_has_no_template(tok):
    assert template_mismatch(get_template("llama2"), tok) is None
    tok.chat_template = to_chat_template(get_template("llama2"))
    assert template_mismatch(get_template("llama2"), tok) is None
    assert template_mismatch(get_template("auto"), tok) is None


def test_mismatch_warns_in_one_line_naming_both(tok):
    tok.chat_template = to_chat_template(get_template("llama2"))
    tok.name_or_path = "meta-llama/Llama-2-7b-chat-hf"
    warning = template_mismatch(get_template("chatml"), tok)
    assert "\n" not in warning
    assert warning.startswith("template 'chatml' differs from the chat_template of meta-llama/Llama-2-7b-chat-hf")
    assert "never stop" in warning


# --- bad conversations ------------------------------------------------------------------------------------------

USER, ASSISTANT = ONE_TURN


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([ASSISTANT, USER], "message 1 of 2 has role 'assistant' where 'user' was expected"),
        ([USER, USER, ASSISTANT], "message 2 of 3 has role 'user' where 'assistant' was expected"),
        ([USER, ASSISTANT, SYSTEM, USER], "message 3 of 4 is a system message: only the first message may be one"),
        ([SYSTEM], "the conversation has only a system message"),
        ([], "the conversation has no messages"),
        ([USER, {"role": "assistant", "content": None}], "message 2 of 2 has no text content"),
    ],
)
@pytest.mark.parametrize("name", ["llama2", "chatml", "auto"])
def test_bad_conversations_raise_user_error_naming_the_position(tok, name, messages, message):
    tok.chat_template = to_chat_template(get_template("chatml"))
    with pytest.raises(UserError) as error:
        render_segments(get_template(name), messages, tok)
    assert error.value.message == message
