"""``tuner doctor --gpu``'s checks (engine.selftest), run here on the CPU with a tiny geometry and the CPU reference
paths: every path this machine can run agrees with the fp32 reference, a path broken on purpose fails with its
difference and the command's exit code says so, and a machine without CUDA is told so and exits 0."""

from __future__ import annotations

import json

import pytest
import torch

from engine.cli import main
from engine.cli.doctor import check_gpu_paths
from engine.selftest import Bench, geometry_config, run_checks

LENGTHS = (9, 21, 5, 14)


def bench(tmp_path, model_type: str = "llama") -> Bench:
    """A geometry small enough for this CPU: grouped-query attention, and eight experts for a Mixtral."""
    from transformers import AutoConfig

    experts = {"num_local_experts": 8, "num_experts_per_tok": 2} if model_type == "mixtral" else {}
    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                                  max_position_embeddings=256, pad_token_id=0, use_cache=False, **experts)
    return Bench(f"tiny {model_type}", config, torch.device("cpu"), LENGTHS, tmp_path, repeats=0)


def test_every_path_a_cpu_runs_agrees_with_the_reference(tmp_path):
    outcomes = {o.path: o for o in run_checks([bench(tmp_path)])}
    passed = {path for path, o in outcomes.items() if o.state == "passed"}
    assert {"SDPA, bf16 autocast, padded", "SDPA, fp16 autocast, padded",
            "tuner_varlen (SDPA per sample), bf16 autocast, padding-free",
            "QLoRA 4-bit (fp32 q/k/v into tuner_varlen), bf16 autocast, padding-free",
            "bitsandbytes 4-bit linear (NF4), forward and backward",
            "bitsandbytes 8-bit linear (LLM.int8), forward and backward"} <= passed
    assert not [o.line() for o in outcomes.values() if o.failed]
    assert outcomes["out-of-memory error and recovery (CUDA allocator)"].state == "not here"
    assert all(o.loss_diff < 2e-2 for o in outcomes.values() if o.loss_diff is not None)


def test_mixtral_fused_experts_in_4_bit_compute_what_their_weights_do(tmp_path):
    from engine.selftest import mixtral_experts_4bit

    (outcome,) = run_checks([bench(tmp_path, "mixtral")], paths=[mixtral_experts_4bit])
    assert outcome.state == "passed", outcome.line()


def test_a_broken_path_fails_with_its_difference_and_the_command_exits_1(tmp_path, monkeypatch, capsys):
    from engine.models import attention
    from engine.selftest import sdpa_bf16, varlen_bf16

    real = attention._per_sample_sdpa
    monkeypatch.setattr(attention, "_per_sample_sdpa",
                        lambda *args: (real(*args)[0] * 1.5, None))  # a kernel giving wrong numbers
    monkeypatch.setattr("engine.selftest.PATHS", [sdpa_bf16, varlen_bf16])
    assert check_gpu_paths(False, [bench(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    broken = next(line for line in lines if "tuner_varlen" in line)
    assert broken.startswith("failed") and "loss" in broken and "over" in broken
    assert any(line.startswith("passed") and "SDPA, bf16" in line for line in lines)
    assert lines[-1] == "1 passed, 1 failed, 0 not installed or not on this card"


def test_without_cuda_the_gpu_check_says_so_and_exits_0(capsys):
    assert main(["doctor", "--gpu"]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    assert main(["doctor", "--gpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cuda"] is False
    assert main(["doctor", "--gpu", "--full"]) == 2
    assert "--gpu and --full are separate checks" in capsys.readouterr().err


@pytest.mark.parametrize("name, expected", [
    ("llama2-7b", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008)),
    ("mistral-7b-v0.1", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                             intermediate_size=14336)),
    ("mixtral-8x7b", dict(hidden_size=4096, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)),
])
def test_the_checked_geometries_are_the_real_models_with_two_layers(name, expected):
    config = geometry_config(name)
    assert config.num_hidden_layers == 2 and config.head_dim == 128
    assert {key: getattr(config, key) for key in expected} == expected


def test_the_gpu_check_names_each_cuda_device_by_its_nvml_number_and_uuid(monkeypatch):
    """The mapping line of `tuner doctor --gpu`, from the recorded 8x H100 machine with CUDA_VISIBLE_DEVICES=3,1 (NVML
    faked at its boundary; torch gives the first device's UUID, not the second's)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "unit"))
    from test_hardware import FakeNvml, recorded

    from engine.cli.doctor import mapping_lines
    from engine.hardware import cuda_nvml_mapping

    state = recorded("8x-h100")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    mapping = cuda_nvml_mapping(FakeNvml(state), cuda_uuids=[state.gpus[3].uuid.split("-", 1)[1], None])
    assert mapping_lines(mapping) == [
        f"cuda:0 -> NVML 3: NVIDIA H100 80GB HBM3 ({state.gpus[3].uuid}, matched by uuid)",
        f"cuda:1 -> NVML 1: NVIDIA H100 80GB HBM3 ({state.gpus[1].uuid}, matched by order)"]


@pytest.mark.gpu
def test_on_a_gpu_every_path_passes_or_is_not_installed(tmp_path):
    """The CUDA paths themselves (torch's varlen kernel, flash-attention-2 and Liger when installed, bitsandbytes on
    the card, the allocator's out-of-memory error), on the small geometry; `tuner doctor --gpu` runs the real ones."""
    small = bench(tmp_path)
    small.device = torch.device("cuda", 0)
    outcomes = run_checks([small])
    assert not [o.line() for o in outcomes if o.failed]
    assert any(o.state == "passed" and o.path.startswith("out-of-memory") for o in outcomes)
