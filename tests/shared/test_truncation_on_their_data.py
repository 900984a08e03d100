"""cutoff_len on LLaMA-Factory's real identity data: our rows are the rows its supervised processor makes."""

from __future__ import annotations

import json

import pytest
from test_truncation import assert_cut_as_llama_factory_cuts, demo_tokenizer, pairs_of

__all__ = ["demo_tokenizer"]  # the unit suite's fixture, used here as it is


@pytest.mark.parametrize("mask_history", [False, True])
def test_llama_factorys_identity_data_tokenizes_as_llama_factory_cuts_it(shared_data, demo_tokenizer, mask_history):
    records = json.loads((shared_data / "llamafactory" / "identity.json").read_text())
    assert_cut_as_llama_factory_cuts(pairs_of(records), demo_tokenizer, mask_history)
