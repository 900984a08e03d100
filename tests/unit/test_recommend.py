"""The method recommendation on recorded GPU states, the seed table beside it, and `tuner estimate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.models.catalog import lookup
from engine.cli import main
from engine.hardware import HardwareState
from engine.memory.estimate import RunShape
from engine.memory.recommend import memory_budget, recommend, seed_column, seed_table

STATES = Path(__file__).resolve().parents[1] / "data" / "gpu_states"
LLAMA2_7B = RunShape(lookup("llama2-7b").geometry, batch_size=4, seq_len=1024)


def recorded(name: str) -> HardwareState:
    return HardwareState.from_json(json.loads((STATES / f"{name}.json").read_text()))


def test_a100_80gb_gets_the_best_method_that_fits_with_margin():
    advice = recommend(LLAMA2_7B, memory_budget(recorded("a100-80gb").gpus))
    assert advice.method == "freeze"
    assert advice.reason.startswith("Freeze (16-bit) is the best method that fits: ")
    assert "Full (16-bit) needs" in advice.reason
    assert [row.fits for row in advice.rows] == [False, True, True, True, True]


def test_busy_rtx_4090_counts_the_memory_another_process_holds():
    state = recorded("2x-rtx-4090")
    busy = min(g.memory_free_gib for g in state.gpus)
    assert memory_budget(state.gpus) == busy < 24
    advice = recommend(LLAMA2_7B, memory_budget(state.gpus))
    assert advice.method == "qlora-4bit"


def test_nothing_fits_says_what_would():
    llama2_70b = RunShape(lookup("llama2-70b").geometry, batch_size=4, seq_len=1024)
    advice = recommend(llama2_70b, memory_budget(recorded("2x-rtx-4090").gpus))
    assert advice.method is None and advice.reason.startswith("no method fits in ")
    assert any(idea.startswith("a smaller model such as ") for idea in advice.suggestions)


def test_nothing_fits_on_16gb_suggests_batch_sequence_and_sharding():
    llama2_13b = RunShape(lookup("llama2-13b").geometry, batch_size=4, seq_len=1024)
    ideas = recommend(llama2_13b, 16.0).suggestions
    assert ideas[0].startswith("per_device_train_batch_size 1 with gradient_accumulation_steps 4")
    assert ideas[1].startswith("cutoff_len 512 at batch 1")
    assert ideas[2].startswith("2 such GPUs with DeepSpeed ZeRO-3")


def test_no_gpu_recommends_nothing_and_says_why():
    advice = recommend(LLAMA2_7B, memory_budget(recorded("none").gpus))
    assert advice.method is None and "no NVIDIA GPU" in advice.reason
    assert all(row.fits is None for row in advice.rows)


def test_seed_table_is_the_familiar_one():
    table = seed_table()
    assert table["methods"]["qlora-4bit"] == [6, 12, 24, 48, 32]
    assert table["methods"]["full"] == [160, 320, 600, 1200, 900]
    assert table["sizes"][seed_column(lookup("llama2-13b").geometry)] == "13B"
    assert table["sizes"][seed_column(lookup("mixtral-8x7b").geometry)] == "8x7B"
    assert table["sizes"][seed_column(lookup("llama2-70b").geometry)] == "65B"


def test_estimate_json_for_a_catalog_model(capsys):
    assert main(["estimate", "--model_name_or_path", "llama2-7b", "--per_device_train_batch_size", "4",
                 "--gpu_memory_gib", "24", "--num_gpus", "1", "--cutoff_len", "1024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"peak_allocated_gib", "total_gib", "components", "assumptions", "recommendation"} <= set(data)
    assert data["recommendation"]["method"] == "lora"
    assert data["recommendation"]["methods"]["qlora-4bit"]["seed_table_gb"] == 6
    assert data["total_gib"] == pytest.approx(17.5, abs=0.1)


def test_estimate_reads_a_local_config(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}))
    assert main(["estimate", "--model_name_or_path", str(tmp_path), "--json", "--gpu_memory_gib", "80",
                 "--num_gpus", "1"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["estimate", "--model_name_or_path", "llama2-7b", "--json", "--gpu_memory_gib", "80",
                 "--num_gpus", "1"]) == 0
    assert local["total_gib"] == json.loads(capsys.readouterr().out)["total_gib"]


def test_gpus_without_a_gpu_is_a_normal_state(capsys):
    assert main(["gpus", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == [] and data["message"].startswith("no NVIDIA GPU found")
