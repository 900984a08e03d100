"""The VRAM estimator: components against hand-computed values, and the whole estimate against measured runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from engine.models.catalog import lookup
from engine.config.schema import parse_args
from engine.memory.estimate import GIB, RunShape, estimate, lora_params
from engine.memory.recommend import shape_from_config

REPO = Path(__file__).resolve().parents[2]
CALIBRATION = sorted((REPO / "bench" / "results").glob("gpu_memory-*.jsonl"))
LLAMA2_7B = lookup("llama2-7b").geometry


def shape_of_measurement(row: dict) -> RunShape:
    """What `tuner estimate` computes for the flags the measured run was started with."""
    return shape_from_config(parse_args(row["flags"].split()), lookup(row["geometry"]).geometry)


MEASURED = [json.loads(line) for path in CALIBRATION for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", MEASURED, ids=[row["config"] for row in MEASURED])
def test_estimate_is_within_15_percent_of_the_measured_peak(row):
    result = estimate(shape_of_measurement(row))
    assert result.trainable_params == row["trainable_params"]
    assert result.peak_allocated_gib == pytest.approx(row["peak_allocated_gib"], rel=0.15)
    assert result.total_gib == pytest.approx(row["nvml_used_gib"], rel=0.15)


def test_calibration_table_is_present_and_covers_each_measured_method():
    assert CALIBRATION, "bench/results holds the measured table the estimator is held to"
    assert {row["config"].split("-")[0] for row in MEASURED} >= {"lora", "qlora4", "qlora8", "freeze"}


def test_lora_trainable_parameters_match_peft_for_llama2_7b():
    # q, k, v, o: 8 x (4096 + 4096) each; gate, up: 8 x (4096 + 11008); down: 8 x (11008 + 4096); 32 layers
    per_layer = 4 * 8 * 8192 + 3 * 8 * 15104
    assert lora_params(LLAMA2_7B, 8, "all") == 32 * per_layer == 19_988_480
    assert lora_params(LLAMA2_7B, 8, "q_proj,v_proj") == 32 * 2 * 8 * 8192 == 4_194_304


def test_lora_components_by_hand():
    result = estimate(RunShape(LLAMA2_7B, method="lora", batch_size=1, seq_len=512))
    c = result.components
    assert c["weights_16bit"] == pytest.approx(6_738_415_616 * 2 / GIB, abs=1e-3)
    assert c["lora_adapters"] == pytest.approx(19_988_480 * 4 / GIB, abs=1e-3)
    assert c["gradients"] == c["lora_adapters"]
    assert c["optimizer_states"] == pytest.approx(19_988_480 * 8 / GIB, abs=1e-3)
    # checkpointed layer inputs (32 x 2 bytes x 4096) + one recomputed layer (28 x 4096 + 8 x 11008) per token
    assert c["activations"] == pytest.approx(512 * (32 * 2 * 4096 + 28 * 4096 + 8 * 11008) / GIB, abs=1e-3)
    assert c["logits_and_loss"] == pytest.approx(512 * 3.3 * 32000 / GIB, abs=1e-3)


def test_qlora_4bit_weights_are_half_a_byte_plus_constants():
    c = estimate(RunShape(LLAMA2_7B, method="qlora-4bit")).components
    linear = 6_738_415_616 - 2 * 32000 * 4096 - 32 * 2 * 4096 - 4096
    assert c["weights_quantized"] == pytest.approx(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) / GIB, abs=1e-3)
    assert c["weights_16bit"] == pytest.approx((6_738_415_616 - linear) * 4 / GIB, abs=1e-3), \
        "k-bit preparation keeps embeddings, head and norms in fp32"


def test_qlora_8bit_weights_are_one_byte_and_its_matmul_keeps_every_layers_inputs():
    result = estimate(RunShape(LLAMA2_7B, method="qlora-8bit", batch_size=1, seq_len=512))
    c = result.components
    assert c["weights_quantized"] == pytest.approx(32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) / GIB, abs=1e-3)
    # per token and layer: the attention's norm output (fp32) that q, k, v share, the attention output (bf16) o_proj
    # takes, the MLP's norm output (fp32) that gate and up share, act(gate) x up (fp32) down_proj takes
    assert c["int8_kept_inputs"] == pytest.approx(512 * 32 * (4 * 4096 + 2 * 4096 + 4 * 4096 + 4 * 11008) / GIB,
                                                  abs=1e-3) == pytest.approx(1.297, abs=1e-3)
    assert c["dequantized_layer"] == pytest.approx(4096 * 11008 * 4 / GIB, abs=1e-3), "to its fp32 input's dtype"
    assert any("out of gradient checkpointing's reach" in line for line in result.assumptions)
    assert "int8_kept_inputs" not in estimate(RunShape(LLAMA2_7B, method="qlora-4bit")).components


def test_qlora_8bit_is_below_lora_at_batch_1_and_above_it_at_8_x_2048_tokens():
    def total(method: str, batch: int, seq: int) -> float:
        return estimate(RunShape(LLAMA2_7B, method=method, batch_size=batch, seq_len=seq)).total_gib

    assert (total("qlora-4bit", 1, 512), total("qlora-8bit", 1, 512), total("lora", 1, 512)) == (7.019, 11.577, 15.508)
    assert (total("qlora-4bit", 8, 2048), total("lora", 8, 2048), total("qlora-8bit", 8, 2048)) == \
        (20.065, 24.447, 67.239)


def test_bitsandbytes_8bit_matmul_keeps_its_input_through_the_engines_checkpointing():
    """What int8_kept_inputs rests on: MatMul8bitLt keeps its input on ``ctx``, out of reach of the non-reentrant
    checkpointing the engine asks for. Should bitsandbytes save it for backward one day, this fails: drop the term."""
    import gc
    import weakref

    import torch

    import bitsandbytes.functional as F
    from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState
    from torch.utils.checkpoint import checkpoint

    from engine.train.arguments import checkpointing_args as _checkpointing_args

    @dataclasses.dataclass
    class Arguments:
        gradient_checkpointing: bool = False

    assert _checkpointing_args(Arguments, True)["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    weight = torch.randn(64, 32, dtype=torch.float16)
    kept = []

    def layer(x):
        state = MatmulLtState()
        state.CB, state.SCB, _ = F.int8_vectorwise_quant(weight)
        normed = x * 2.0  # made inside the checkpointed layer, as a norm's output is
        kept.append(weakref.ref(normed))
        return MatMul8bitLt.apply(normed, weight, None, None, state)

    for reentrant, alive in ((False, True), (True, False)):
        kept.clear()
        x = torch.randn(4, 32, requires_grad=True)
        out = checkpoint(layer, x, use_reentrant=reentrant)
        gc.collect()
        assert (kept[0]() is not None) is alive, f"use_reentrant={reentrant}"
        out.float().sum().backward()
        assert x.grad is not None


def test_gradient_checkpointing_and_batch_scale_activations():
    small = estimate(RunShape(LLAMA2_7B, batch_size=1, seq_len=1024))
    double = estimate(RunShape(LLAMA2_7B, batch_size=2, seq_len=1024))
    no_checkpointing = estimate(RunShape(LLAMA2_7B, batch_size=1, seq_len=1024, gradient_checkpointing=False))
    assert double.components["activations"] == pytest.approx(2 * small.components["activations"], abs=2e-3)
    assert no_checkpointing.components["activations"] > 5 * small.components["activations"]
    eager = estimate(RunShape(LLAMA2_7B, seq_len=1024, attention="eager"))
    assert eager.components["activations"] > small.components["activations"]


def test_tied_embeddings_and_grouped_query_attention_count_once():
    llama3 = lookup("llama3.2-1b").geometry
    assert llama3.tie_word_embeddings and llama3.num_key_value_heads < llama3.num_attention_heads
    result = estimate(RunShape(llama3, method="full"))
    assert result.trainable_params == 1_235_814_400


def test_zero3_shards_weights_and_states_across_gpus():
    one = estimate(RunShape(LLAMA2_7B, method="full"))
    four = estimate(RunShape(LLAMA2_7B, method="full", num_gpus=4, sharding="zero3"))
    assert four.components["optimizer_states"] == pytest.approx(one.components["optimizer_states"] / 4, abs=1e-3)
    assert four.components["weights_trainable_fp32"] == pytest.approx(one.components["weights_trainable_fp32"] / 4,
                                                                      abs=1e-3)
    ddp = estimate(RunShape(LLAMA2_7B, method="lora", num_gpus=2))
    assert ddp.components["ddp_gradient_buckets"] == ddp.components["gradients"]


def test_pure_bf16_holds_weights_gradients_and_states_in_bfloat16():
    mixed = estimate(RunShape(LLAMA2_7B, method="full"))
    pure = estimate(RunShape(LLAMA2_7B, method="full", precision="pure_bf16"))
    assert pure.components["weights_trainable_bf16"] == pytest.approx(mixed.components["weights_trainable_fp32"] / 2,
                                                                      abs=1e-3)
    for key in ("gradients", "optimizer_states"):
        assert pure.components[key] == pytest.approx(mixed.components[key] / 2, abs=1e-3)
    assert pure.components["autocast_weight_copies"] == 0 < mixed.components["autocast_weight_copies"]
    assert "no autocast" in pure.assumptions[0]
    shape = shape_from_config(parse_args(["--pure_bf16"]), LLAMA2_7B)
    assert shape.precision == "pure_bf16"


def test_mixtral_experts_are_4bit_under_qlora_4bit_and_16bit_under_8bit_and_say_so():
    mixtral = lookup("mixtral-8x7b").geometry
    four = estimate(RunShape(mixtral, method="qlora-4bit"))
    assert any("experts" in a and "4-bit" in a for a in four.assumptions)
    assert four.components["weights_quantized"] > 20 * four.components["weights_16bit"]
    eight = estimate(RunShape(mixtral, method="qlora-8bit"))
    assert any("experts" in a and "stay 16-bit" in a for a in eight.assumptions)
    assert eight.components["weights_16bit"] > eight.components["weights_quantized"]



MIXTRAL_LAYER_EXPERTS = 8 * 3 * 4096 * 14336  # gate_up (8 x 2 x 14336 x 4096) and down (8 x 4096 x 14336)


def test_4bit_experts_are_held_dequantized_by_every_layer_without_checkpointing_and_by_one_with_it():
    mixtral = lookup("mixtral-8x7b").geometry
    layer = MIXTRAL_LAYER_EXPERTS * 2 / GIB  # one layer's experts in bf16: 2.625 GiB
    on = estimate(RunShape(mixtral, method="qlora-4bit"))
    off = estimate(RunShape(mixtral, method="qlora-4bit", gradient_checkpointing=False))
    assert on.components["dequantized_experts"] == pytest.approx(layer, abs=1e-3)
    assert off.components["dequantized_experts"] == pytest.approx(32 * layer, abs=1e-3)
    assert off.total_gib - on.total_gib > 31 * layer
    assert any("every layer's 4-bit fused experts" in a for a in off.assumptions)
    fp32 = estimate(RunShape(mixtral, method="qlora-4bit", precision="fp32"))
    assert fp32.components["dequantized_experts"] == pytest.approx(2 * layer, abs=1e-3), "dequantized to fp32"
    for method in ("qlora-8bit", "lora"):  # 16-bit experts: autograd saves the parameters themselves
        assert "dequantized_experts" not in estimate(RunShape(mixtral, method=method,
                                                              gradient_checkpointing=False)).components
    assert "dequantized_experts" not in estimate(RunShape(LLAMA2_7B, method="qlora-4bit")).components


def test_a_mixture_of_experts_peaks_while_loading_when_training_holds_less_and_says_so():
    """Loading holds the weights as loaded (what is not quantized still 16-bit) and the last fused gate_up tensor
    being joined: its stacked pieces beside the joined tensor, all 16-bit (under 4-bit quantized right after)."""
    mixtral = lookup("mixtral-8x7b").geometry
    linears = 2 * 4096 * 4096 + 2 * 4096 * 1024  # q, o; k, v
    others = 2 * 4096 + 8 * 4096  # norms, router
    head = 2 * 32000 * 4096 + 4096  # embeddings, LM head, final norm
    gate_up = MIXTRAL_LAYER_EXPERTS * 2 // 3
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)

    one_layer = dataclasses.replace(mixtral, num_hidden_layers=1)
    short = estimate(RunShape(one_layer, method="qlora-4bit", seq_len=16))
    loading = (linears + MIXTRAL_LAYER_EXPERTS) * nf4 + (others + head) * 2 + 2 * gate_up * 2
    assert short.peak_allocated_gib == pytest.approx(loading / GIB, abs=1e-3)
    assert any(a.startswith("the peak is while the model loads") for a in short.assumptions)
    long = estimate(RunShape(one_layer, method="qlora-4bit", seq_len=2048))
    assert long.peak_allocated_gib > loading / GIB
    assert not any("while the model loads" in a for a in long.assumptions)

    eight = estimate(RunShape(mixtral, method="qlora-8bit", seq_len=16))  # the experts stay 16-bit
    loading = 32 * linears + (32 * (MIXTRAL_LAYER_EXPERTS + others) + head) * 2 + gate_up * 2
    assert eight.peak_allocated_gib == pytest.approx(loading / GIB, abs=1e-3)
    for method in ("lora", "qlora-4bit"):
        dense = estimate(RunShape(LLAMA2_7B, method=method, seq_len=16))
        assert not any("while the model loads" in a for a in dense.assumptions)


def test_json_has_the_documented_keys():
    data = estimate(dataclasses.replace(RunShape(LLAMA2_7B), method="freeze")).to_json()
    assert {"peak_allocated_gib", "total_gib", "components", "assumptions"} <= set(data)


def test_a_preference_pair_doubles_the_batch_and_only_losses_against_a_reference_count_one():
    """DPO's full fine-tune holds a second, frozen model; ORPO and SimPO hold none (shape_from_config reads
    pref_loss); with LoRA the reference is a copy of the adapter."""
    def shape(*args: str) -> RunShape:
        return shape_from_config(parse_args(["--model_name_or_path", "llama2-7b", "--stage", "dpo",
                                             "--cutoff_len", "1024", *args]), LLAMA2_7B)

    sft = estimate(shape_from_config(parse_args(["--model_name_or_path", "llama2-7b", "--cutoff_len", "1024",
                                                 "--finetuning_type", "full"]), LLAMA2_7B))
    dpo = estimate(shape("--finetuning_type", "full"))
    orpo = estimate(shape("--finetuning_type", "full", "--pref_loss", "orpo"))
    lora = estimate(shape("--finetuning_type", "lora"))
    assert dpo.components["reference_model"] == pytest.approx(dpo.trainable_params * 2 / GIB, abs=1e-3)
    assert "reference_model" not in orpo.components and "reference_adapter" not in orpo.components
    assert lora.components["reference_adapter"] == pytest.approx(lora.trainable_params * 2 / GIB, abs=1e-3)
    assert orpo.components["activations"] == pytest.approx(2 * sft.components["activations"], rel=1e-3)
    assert any("no reference model (ORPO, SimPO)" in line for line in orpo.assumptions)
    kto = estimate(shape_from_config(parse_args(["--model_name_or_path", "llama2-7b", "--stage", "kto",
                                                 "--cutoff_len", "1024", "--finetuning_type", "full"]), LLAMA2_7B))
    assert kto.components["reference_model"] == dpo.components["reference_model"]
    assert kto.components["activations"] == sft.components["activations"]  # its KL forward keeps none


def test_a_reward_model_has_a_score_head_in_place_of_the_lm_head():
    """Stage rm: both conversations of a pair in one forward, no reference, no vocabulary-wide logits, no LM head
    (and its upcast copy under QLoRA), the one-output head trained whole beside the adapter."""
    def shape(stage: str, *args: str) -> RunShape:
        return shape_from_config(parse_args(["--model_name_or_path", "llama2-7b", "--stage", stage,
                                             "--cutoff_len", "1024", *args]), LLAMA2_7B)

    rm, sft = estimate(shape("rm")), estimate(shape("sft"))
    head = LLAMA2_7B.vocab_size * LLAMA2_7B.hidden_size
    assert rm.trainable_params == sft.trainable_params + LLAMA2_7B.hidden_size
    assert rm.components["weights_16bit"] == pytest.approx(sft.components["weights_16bit"] - head * 2 / GIB,
                                                           abs=1e-2)
    assert rm.components["activations"] == pytest.approx(2 * sft.components["activations"], rel=1e-3)
    assert rm.components["logits_and_loss"] < 0.01 < sft.components["logits_and_loss"]
    assert not any(key.startswith("reference") for key in rm.components)
    assert any("score head" in line for line in rm.assumptions)
    qlora_rm, qlora_sft = estimate(shape("rm", "--quantization_bit", "4")), estimate(shape("sft", "--quantization_bit",
                                                                                          "4"))
    assert qlora_rm.components["autocast_weight_copies"] < qlora_sft.components["autocast_weight_copies"]


def test_a_ref_model_counts_as_a_whole_model_in_its_bits():
    """ref_model replaces LoRA's adapter copy with a second model, as large as the one trained (its geometry is not
    read), in ref_model_quantization_bit bits when given."""
    def dpo(*args: str):
        return estimate(shape_from_config(parse_args(["--model_name_or_path", "llama2-7b", "--stage", "dpo",
                                                      "--cutoff_len", "1024", *args]), LLAMA2_7B))

    own, whole, four = dpo(), dpo("--ref_model", "llama2-7b"), dpo("--ref_model", "llama2-7b",
                                                                  "--ref_model_quantization_bit", "4")
    assert "reference_adapter" in own.components and "reference_adapter" not in whole.components
    assert whole.components["reference_model"] == pytest.approx(13.0, rel=0.05)  # 7B parameters in 16 bits
    assert four.components["reference_model"] == pytest.approx(whole.components["reference_model"] / 4 * 1.03,
                                                               rel=0.02)
    assert any("ref_model, counted as large as the model trained, in 4 bits" in a for a in four.assumptions)


def test_precomputed_reference_log_probs_hold_no_second_model():
    def dpo(*args: str):
        return estimate(shape_from_config(parse_args(["--model_name_or_path", "llama2-7b", "--stage", "dpo",
                                                      "--cutoff_len", "1024", "--finetuning_type", "full", *args]),
                                          LLAMA2_7B))

    held, precomputed = dpo(), dpo("--precompute_ref_log_probs", "true")
    assert "reference_model" in held.components and "reference_model" not in precomputed.components
    assert precomputed.total_gib < held.total_gib - 10
    assert "reference_model" in dpo("--precompute_ref_log_probs", "true", "--ref_model", "llama2-7b").components
