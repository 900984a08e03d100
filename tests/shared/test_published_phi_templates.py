"""Phi-3's templates against the published phi-3 chat template files (LLaMA-Factory has no definition of its own for
them to follow)."""

from __future__ import annotations

import pytest
from test_templates_published import PADDED, SYSTEM, TWO_TURNS, tok

from engine.templates import get_template, render_text

__all__ = ["tok"]  # the unit suite's tiny tokenizer fixture, used here as it is


def published(shared_data, name: str) -> str:
    path = shared_data / "chat_templates" / f"{name}.jinja"
    return path.read_text().replace("    ", "").replace("\n", "")  # a missing file fails the test


@pytest.mark.parametrize("conversation", [TWO_TURNS, [SYSTEM, *TWO_TURNS], PADDED], ids=["two", "system", "padded"])
@pytest.mark.parametrize(("name", "jinja"), [("phi", "phi-3"), ("phi_small", "phi-3-small")])
def test_phi_renders_as_the_published_phi_3_files(shared_data, tok, name, jinja, conversation):
    tok.chat_template = published(shared_data, jinja)
    template = get_template(name)
    expected = tok.apply_chat_template(conversation, tokenize=False).replace("<s>", "<|endoftext|>", 1)
    assert render_text(template, conversation) == expected
