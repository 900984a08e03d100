"""Our templates against the published chat templates of ../shared/data/chat_templates: the same text for the same
conversation, and the deliberate differences, each named."""

from __future__ import annotations

import pytest
from test_templates import CONVERSATIONS, SYSTEM, TWO_TURNS, hf_render, tok, trained_tokenizer, with_default_system

from engine.templates import encode, get_template, render_text, template_mismatch

__all__ = ["tok", "trained_tokenizer"]  # fixtures of the unit suite's templates tests, used here as they are

# Our name -> the published file in ../shared/data/chat_templates.
PUBLISHED = {
    "alpaca": "alpaca",
    "llama2": "llama-2-chat",
    "mistral": "mistral-instruct",
    "llama3": "llama-3-instruct",
    "chatml": "chatml",
    "qwen": "qwen2.5-instruct",
    "vicuna": "vicuna",
    "zephyr": "zephyr",
    "gemma": "gemma-it",
}


def published(shared_data, name: str) -> str:
    text = (shared_data / "chat_templates" / f"{PUBLISHED[name]}.jinja").read_text()
    if name == "qwen":
        # Qwen's file is laid out as Qwen ships it: real newlines inside its strings and {%- -%} trimming the rest.
        # The README's recipe (delete every newline) would delete the newlines of the format itself.
        return text
    return text.replace("    ", "").replace("\n", "")


@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
@pytest.mark.parametrize("name", ["alpaca", "llama2", "llama3", "chatml", "qwen", "vicuna", "zephyr"])
def test_render_equals_the_published_template(shared_data, tok, name, conversation):
    # The published files carry no default system prompt; ours carry LLaMA-Factory's (Alpaca's preamble, Vicuna's,
    # Zephyr's), so the published file is given it as the system message (a deliberate change for those three).
    template, jinja = get_template(name), published(shared_data, name)
    theirs = with_default_system(template, conversation) if name != "qwen" else conversation
    assert render_text(template, conversation, tok) == hf_render(tok, jinja, theirs)
    prompt = conversation[:-1]
    assert render_text(template, prompt, tok, add_generation_prompt=True) == hf_render(tok, jinja, theirs[:-1], True)


@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_mistral_differs_from_the_published_file_only_in_where_the_system_prompt_goes(shared_data, tok, conversation):
    ours = render_text(get_template("mistral"), conversation, tok)
    theirs = hf_render(tok, published(shared_data, "mistral"), conversation)
    if conversation[0]["role"] != "system":
        assert ours == theirs
    else:
        # Deliberate: the published file writes the system prompt bare before the first [INST]; Mistral's own
        # chat templates put it inside the first [INST], which is also what the brief's "no system role" means.
        assert theirs.startswith("<s>Be brief.\n\n[INST] Hi [/INST]")
        assert ours.startswith("<s>[INST] Be brief.\n\nHi [/INST]")
        assert ours.replace("[INST] Be brief.\n\n", "Be brief.\n\n[INST] ", 1) == theirs


@pytest.mark.parametrize("conversation", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_gemma_adds_bos_to_the_published_file(shared_data, tok, conversation):
    # Deliberate: the published gemma-it file emits no bos, relying on the tokenizer adding it; we encode with
    # add_special_tokens=False, and Google's own Gemma chat template starts with bos_token, so ours does too.
    jinja = published(shared_data, "gemma")
    assert render_text(get_template("gemma"), conversation, tok) == "<s>" + hf_render(tok, jinja, conversation)
    prompt = conversation[:-1]
    ours = render_text(get_template("gemma"), prompt, tok, add_generation_prompt=True)
    assert ours == "<s>" + hf_render(tok, jinja, prompt, True)


@pytest.mark.parametrize("name", ["llama2", "chatml", "alpaca", "llama3", "qwen", "vicuna", "zephyr"])
def test_auto_masks_match_with_the_published_template(shared_data, tok, name):
    tok.chat_template = published(shared_data, name)
    conversation = [SYSTEM, *TWO_TURNS]
    assert encode(tok, get_template("auto"), conversation) == encode(tok, get_template(name), conversation)


def test_no_mismatch_is_reported_for_the_published_llama_2_file(shared_data, tok):
    tok.chat_template = published(shared_data, "llama2")
    assert template_mismatch(get_template("llama2"), tok) is None
