"""The method recommendation on recorded GPU states and its rule, LLaMA-Factory's README table beside it, and
`tuner estimate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.models.catalog import lookup
from engine.cli import main
from engine.hardware import HardwareState
from engine.memory.estimate import RunShape
from engine.memory.recommend import llamafactory_column, llamafactory_table, memory_budget, recommend

STATES = Path(__file__).resolve().parents[1] / "data" / "gpu_states"
LLAMA2_7B = RunShape(lookup("llama2-7b").geometry, batch_size=4, seq_len=1024)


def recorded(name: str) -> HardwareState:
    return HardwareState.from_json(json.loads((STATES / f"{name}.json").read_text()))


LORA_WHY = "why: LoRA whenever it fits (LLaMA-Factory's default: small adapters, quality close to full fine-tuning)"


@pytest.mark.parametrize("model", ["llama2-7b", "llama2-13b"])
def test_an_80gb_card_recommends_lora_for_7b_and_13b_though_freeze_fits_too(model):
    advice = recommend(RunShape(lookup(model).geometry, batch_size=4, seq_len=1024),
                       memory_budget(recorded("a100-80gb").gpus))
    assert advice.method == "lora"
    assert advice.reason.startswith("LoRA (16-bit) is recommended: ")
    assert advice.why == LORA_WHY + "; Freeze also fits, to train whole layers"
    assert [row.fits for row in advice.rows] == [False, True, True, True, True]


def test_full_and_freeze_are_never_recommended_even_where_both_fit():
    advice = recommend(RunShape(lookup("llama3.2-1b").geometry, batch_size=4, seq_len=1024), 80.0)
    assert [row.fits for row in advice.rows] == [True] * 5
    assert advice.method == "lora" and advice.why == LORA_WHY + "; Full and Freeze also fit, to train whole layers"


def test_lora_too_big_falls_to_qlora_and_says_what_lora_and_8bit_need():
    advice = recommend(RunShape(lookup("llama2-7b").geometry, batch_size=8, seq_len=2048), 24.0)
    assert advice.method == "qlora-4bit"
    assert advice.reason == ("QLoRA 4-bit is recommended: 20.065 GiB of 21.6 GiB usable per GPU (24 GiB less a 10% "
                             "margin)")
    assert advice.why == ("why: LoRA (16-bit) needs 24.4 GiB, QLoRA 8-bit 67.2 GiB; QLoRA 4-bit trains the same LoRA "
                          "adapters over quantized weights")


def test_the_8bit_row_says_why_it_needs_more_than_lora_where_it_does():
    def note(batch: int, seq: int) -> str:
        rows = recommend(RunShape(lookup("llama2-7b").geometry, batch_size=batch, seq_len=seq), 80.0).rows
        return next(row.note for row in rows if row.method == "qlora-8bit")

    assert note(1, 512) == ""  # 11.6 GiB against LoRA's 15.5
    assert note(8, 2048) == ("above LoRA (16-bit) at this batch: the layer inputs its 8-bit matmul keeps for the "
                             "backward pass take 41.5 GiB at 8 x 2048 tokens")


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


def test_llamafactory_table_is_the_one_in_its_readme():
    table = llamafactory_table()
    assert table["methods"]["qlora-4bit"] == [6, 12, 24, 48, 32]
    assert table["methods"]["full"] == [160, 320, 600, 1200, 900]
    assert table["sizes"][llamafactory_column(lookup("llama2-13b").geometry)] == "13B"
    assert table["sizes"][llamafactory_column(lookup("mixtral-8x7b").geometry)] == "8x7B"
    assert table["sizes"][llamafactory_column(lookup("llama2-70b").geometry)] == "65B"


def test_estimate_json_for_a_catalog_model(capsys):
    assert main(["estimate", "--model_name_or_path", "llama2-7b", "--per_device_train_batch_size", "4",
                 "--gpu_memory_gib", "24", "--num_gpus", "1", "--cutoff_len", "1024", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"peak_allocated_gib", "total_gib", "components", "assumptions", "recommendation"} <= set(data)
    assert data["recommendation"]["method"] == "lora"
    assert data["recommendation"]["why"] == LORA_WHY  # 17.5 GiB of 21.6 usable; nothing else fits beside it
    assert data["recommendation"]["methods"]["qlora-4bit"]["seed_table_gb"] == 6  # the key scripts already read
    assert data["recommendation"]["methods"]["qlora-8bit"]["note"].startswith("above LoRA (16-bit) at this batch")
    assert data["total_gib"] == pytest.approx(17.5, abs=0.1)


def test_estimate_table_names_llamafactory_and_says_why_the_method(capsys):
    assert main(["estimate", "--model_name_or_path", "llama2-7b", "--gpu_memory_gib", "80", "--num_gpus", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    assert "seed" not in out
    assert "method estimate GiB LLaMA-Factory GB fits" in out and "LoRA (16-bit) 24.4 16 yes" in out
    assert ("LLaMA-Factory GB: the VRAM table in LLaMA-Factory's README for 7B models, for comparison (it does not "
            "change with batch or cutoff_len)") in out
    assert ("QLoRA 8-bit: above LoRA (16-bit) at this batch: the layer inputs its 8-bit matmul keeps for the backward "
            "pass take 41.5 GiB at 8 x 2048 tokens") in out
    assert (f"LoRA (16-bit) is recommended: 24.447 GiB of 72 GiB usable per GPU (80 GiB less a 10% margin) "
            f"{LORA_WHY}; Freeze also fits, to train whole layers") in out


def test_estimate_of_a_model_far_from_llamafactorys_sizes_leaves_its_column_out(capsys):
    assert main(["estimate", "--model_name_or_path", "llama3.2-1b", "--gpu_memory_gib", "80", "--num_gpus", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "method estimate GiB fits" in out and "LLaMA-Factory GB" not in out
    assert "LLaMA-Factory's README VRAM table left out: its nearest figures are for 7B models, not this one" in out


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
