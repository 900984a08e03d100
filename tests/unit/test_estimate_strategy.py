"""Multi-GPU strategies in the estimate (ZeRO / FSDP sharding, CPU offload), 4-bit fused experts, and the cheapest
strategy the recommendation offers."""

from __future__ import annotations

import json

import pytest

from engine.cli import main
from engine.config.schema import parse_args
from engine.memory.estimate import GIB, RunShape, estimate
from engine.memory.recommend import recommend, shape_from_config
from engine.models.catalog import lookup

LLAMA2_7B = lookup("llama2-7b").geometry
LLAMA2_70B = lookup("llama2-70b").geometry
MIXTRAL = lookup("mixtral-8x7b").geometry


@pytest.mark.parametrize(("strategy", "sharding", "offload"), [
    ("ddp", "ddp", False), ("fsdp", "zero3", False), ("fsdp_offload", "zero3", True), ("zero2", "zero2", False),
    ("zero2_offload", "zero2", True), ("zero3", "zero3", False), ("zero3_offload", "zero3", True)])
def test_strategy_key_sets_the_sharding_and_offload_of_the_shape(strategy, sharding, offload):
    shape = shape_from_config(parse_args(["--strategy", strategy]), LLAMA2_7B, num_gpus=4)
    assert (shape.sharding, shape.offload) == (sharding, offload)


def test_the_users_own_fsdp_string_still_counts_under_ddp():
    assert shape_from_config(parse_args(["--fsdp", "full_shard auto_wrap"]), LLAMA2_7B).sharding == "zero3"
    assert shape_from_config(parse_args(["--fsdp", "shard_grad_op"]), LLAMA2_7B).sharding == "zero2"


def test_zero2_offload_moves_optimizer_states_and_fp32_masters_to_the_cpu():
    plain = estimate(RunShape(LLAMA2_7B, method="full", num_gpus=4, sharding="zero2"))
    off = estimate(RunShape(LLAMA2_7B, method="full", num_gpus=4, sharding="zero2", offload=True))
    assert off.components["optimizer_states"] == 0 < plain.components["optimizer_states"]
    assert off.components["optimizer_step_temporaries"] == 0
    assert off.components["weights_trainable_16bit"] == pytest.approx(6_738_415_616 * 2 / GIB, abs=1e-3)
    assert "weights_trainable_fp32" not in off.components
    assert off.components["gradients"] == plain.components["gradients"]
    # a quarter of the 8-byte states and the 4-byte masters less their 16-bit copy: 6.7B x (2 + 2) bytes
    assert any(a.startswith("CPU offload: optimizer states and fp32 master weights in CPU memory (about 25.1 GiB")
               for a in off.assumptions)


def test_zero3_offload_leaves_only_the_gathered_layer_of_weights_on_the_gpu():
    off = estimate(RunShape(LLAMA2_70B, method="lora", num_gpus=8, sharding="zero3", offload=True))
    assert off.components["weights_16bit"] == off.components["lora_adapters"] == off.components["optimizer_states"] == 0
    layer = 2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192  # q, o; k, v (GQA); MLP; norms
    assert off.components["gathered_layer"] == pytest.approx(layer * 2 / GIB, abs=1e-3)
    assert any("optimizer states and weights in CPU memory" in a for a in off.assumptions)
    assert off.total_gib < estimate(RunShape(LLAMA2_70B, method="lora", num_gpus=8, sharding="zero3")).total_gib


def test_ddp_has_no_offload():
    ddp = estimate(RunShape(LLAMA2_7B, method="lora", num_gpus=2, offload=True))
    assert ddp.components["optimizer_states"] > 0 and not any("CPU offload" in a for a in ddp.assumptions)


def test_mixtral_8x7b_qlora_4bit_fits_one_80gb_card_with_its_experts_quantized():
    result = estimate(RunShape(MIXTRAL, method="qlora-4bit"))
    experts = 32 * 8 * 3 * 4096 * 14336
    assert result.components["weights_quantized"] >= experts * (0.5 + 1 / 64) / GIB
    assert result.total_gib == pytest.approx(30.46, abs=0.1)  # with one layer's experts dequantized (2.6 GiB)
    advice = recommend(RunShape(MIXTRAL), 80.0)
    assert next(row for row in advice.rows if row.method == "qlora-4bit").fits
    assert advice.method == "qlora-4bit" and advice.strategy is None


def test_mixtral_qlora_8bit_keeps_experts_16bit():
    result = estimate(RunShape(MIXTRAL, method="qlora-8bit"))
    assert result.components["weights_16bit"] > 32 * 8 * 3 * 4096 * 14336 * 2 / GIB
    assert not recommend(RunShape(MIXTRAL, method="qlora-8bit"), 80.0).rows[3].fits


def test_llama2_70b_on_8x80gb_shards_lora_with_zero3_instead_of_ddp():
    advice = recommend(RunShape(LLAMA2_70B, num_gpus=8), 80.0)
    assert advice.strategy == "zero3" and advice.method == "lora"
    assert advice.reason == ("LoRA (16-bit) with FSDP or ZeRO-3 (strategy zero3) is recommended: 22.413 GiB of 72 GiB "
                             "usable per GPU (80 GiB less a 10% margin) over 8 GPUs; LoRA (16-bit) does not fit with "
                             "DDP or ZeRO-2")
    assert advice.why.startswith("why: LoRA whenever it fits") and advice.why.endswith(
        "Freeze also fits, to train whole layers")  # under ZeRO-3, the strategy recommended
    lora_zero3 = estimate(RunShape(LLAMA2_70B, method="lora", num_gpus=8, sharding="zero3"))
    assert lora_zero3.total_gib <= 72.0 < estimate(RunShape(LLAMA2_70B, method="lora", num_gpus=8)).total_gib
    assert advice.to_json()["strategy"] == "zero3"


def test_llama2_7b_lora_on_2x24gb_stays_ddp():
    advice = recommend(RunShape(LLAMA2_7B, num_gpus=2), 24.0)
    assert (advice.method, advice.strategy) == ("lora", "ddp")
    assert advice.reason.startswith("LoRA (16-bit) with DDP (strategy ddp) is recommended: ")


def test_quantized_under_a_sharded_strategy_beats_offload():
    advice = recommend(RunShape(LLAMA2_70B, num_gpus=4), 24.0)
    assert (advice.method, advice.strategy) == ("qlora-4bit", "zero3")
    assert advice.reason.endswith("; LoRA (16-bit) does not fit without CPU offload, nor QLoRA with DDP or ZeRO-2")


def test_offload_is_chosen_only_when_nothing_else_fits():
    advice = recommend(RunShape(LLAMA2_70B, num_gpus=2), 16.0)
    assert advice.strategy == "zero3_offload"
    assert advice.reason.endswith("no method fits without CPU offload")
    for strategy in ("ddp", "zero2", "zero3"):
        shape = RunShape(LLAMA2_70B, num_gpus=2, sharding=strategy)
        assert not any(row.fits for row in recommend(shape, 16.0).rows)


def test_one_gpu_has_no_strategy():
    advice = recommend(RunShape(LLAMA2_7B, batch_size=4), 80.0)
    assert advice.strategy is None and advice.method == "lora"


def test_estimate_command_shows_the_strategy_and_the_recommended_one(capsys):
    assert main(["estimate", "--model_name_or_path", "llama2-70b", "--strategy", "zero3_offload", "--num_gpus", "8",
                 "--gpu_memory_gib", "80", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["strategy"] == "zero3_offload" and data["num_gpus"] == 8
    assert data["recommendation"]["strategy"] == "zero3"
    assert main(["estimate", "--model_name_or_path", "llama2-70b", "--strategy", "zero3", "--num_gpus", "8",
                 "--gpu_memory_gib", "80"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    assert "8 GPUs with FSDP or ZeRO-3 (strategy zero3)" in out
    assert "with FSDP or ZeRO-3 (strategy zero3) is recommended" in out
