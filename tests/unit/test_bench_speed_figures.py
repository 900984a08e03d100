"""bench/speed.py's figures, pure: the card-name table of bf16 peaks (names as torch.cuda.get_device_name and NVML
report them), the model FLOPs per token behind MFU, and the timing window after the warm-up steps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.models.catalog import lookup

SPEED = Path(__file__).resolve().parents[2] / "bench" / "speed.py"
_spec = importlib.util.spec_from_file_location("bench_speed", SPEED)
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)


@pytest.mark.parametrize("card, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4),  # the SXM5 card
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA A10G", 70.0),
    ("NVIDIA B200", 2250.0),
])
def test_each_card_gets_its_own_bf16_peak_not_a_relatives(card, tflops):
    assert speed.peak_flops(card) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("card", ["NVIDIA H100", "NVIDIA L40", "NVIDIA GeForce RTX 4090 D", "NVIDIA A10",
                                  "NVIDIA GH200 480GB", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "cpu", "", None])
def test_a_card_not_in_the_table_gets_no_peak_rather_than_a_guess(card):
    assert speed.peak_flops(card) is None


def test_model_flops_per_token_are_6n_without_the_input_embedding_plus_attention():
    g = lookup("llama2-7b").geometry
    non_embedding = 6_738_415_616 - 32_000 * 4096  # Llama-2-7B's parameters less the input embedding
    assert speed.flops_per_token(g, 512) == 6 * non_embedding + 12 * 32 * 4096 * 512


def test_the_timing_starts_after_the_warmup_steps_and_counts_their_tokens_out():
    step_ends = [10.0, 15.0, 16.0, 17.0, 18.5]  # training's start, then the end of steps 1-4
    tokens = [0, 1000, 2000, 2600, 4100]
    assert speed.timed(step_ends, tokens, warmup=2) == {"seconds": 2.5, "tokens": 2100, "steps": 2,
                                                        "tokens_per_s": 840.0}
    assert speed.timed(step_ends, tokens, warmup=0)["seconds"] == 8.5


def test_a_run_with_no_step_after_the_warmup_is_refused_with_what_to_change():
    with pytest.raises(SystemExit, match="--samples"):
        speed.timed([0.0, 1.0, 2.0], [0, 10, 20], warmup=2)
