"""Auto-fit and the speed plan: the batch layout chosen for the memory at hand, and every speed feature with its
reason (engine.memory.autofit, engine.train.speed). GPUs are described, not present: these are pure decisions."""

from __future__ import annotations

import pytest

from engine.config.schema import parse_args
from engine.data.stats import Lengths
from engine.errors import UserError
from engine.memory.autofit import BATCH_TOLERANCE, MARGIN, PACKING_FILL, Fit, backoff, fit_cpu, fit_gpu
from engine.memory.estimate import RunShape, estimate
from engine.memory.recommend import shape_from_config
from engine.models.attention import VARLEN
from engine.models.catalog import lookup
from engine.train.speed import Machine, ModelTraits, plan_speed

LLAMA2_7B = lookup("llama2-7b").geometry
ALPACA = Lengths(mean=180.0, longest=1024)  # alpaca-like: median ~180 tokens, a few long ones cut at 1024


def h200(free_gib: float = 139.0, liger=frozenset({"llama", "mistral", "mixtral"}), flash=False) -> Machine:
    return Machine(on_gpu=True, flash_attn_installed=flash, torch_varlen=True, liger_model_types=liger,
                   free_gib=free_gib, available_ram_gib=100.0)


CPU = Machine(on_gpu=False, flash_attn_installed=False, torch_varlen=False, liger_model_types=None, free_gib=None,
              available_ram_gib=20.0)


def plan(flags: str, machine: Machine, lengths: Lengths = ALPACA, model_type: str = "llama",
         traits: ModelTraits | None = None):
    cfg = parse_args(f"--model_name_or_path meta-llama/Llama-2-7b-hf {flags}".split())
    return plan_speed(cfg, machine, lengths, traits or ModelTraits(model_type), shape_from_config(cfg, LLAMA2_7B))


def samples_per_step(fit: Fit, lengths: Lengths) -> float:
    per_micro_batch = fit.tokens * PACKING_FILL / lengths.mean if fit.tokens else fit.micro_batch
    return per_micro_batch * fit.accumulation


@pytest.mark.parametrize("flags", ["--per_device_train_batch_size 2 --gradient_accumulation_steps 4",
                                   "--per_device_train_batch_size 8 --gradient_accumulation_steps 8",
                                   "--per_device_train_batch_size 4 --gradient_accumulation_steps 16 "
                                   "--quantization_bit 4"])
@pytest.mark.parametrize("free_gib", [139.0, 40.0, 24.0])
def test_the_fit_keeps_the_samples_per_step_and_fits_the_free_memory(flags, free_gib):
    p = plan(flags, h200(free_gib))
    cfg = parse_args(flags.split())
    asked = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    assert abs(samples_per_step(p.fit, ALPACA) - asked) <= BATCH_TOLERANCE * asked
    assert p.fit.estimate_gib <= free_gib * (1 - MARGIN)
    if p.fit.tokens:
        assert p.fit.tokens >= ALPACA.longest  # a packed row holds the longest sample whole


def test_with_room_checkpointing_goes_off_and_a_tight_card_turns_it_back_on():
    roomy = plan("--per_device_train_batch_size 8 --gradient_accumulation_steps 8", h200(139.0)).fit
    tight = plan("--per_device_train_batch_size 8 --gradient_accumulation_steps 8", h200(24.0)).fit
    assert not roomy.gradient_checkpointing and roomy.tokens and roomy.accumulation == 1
    assert tight.gradient_checkpointing or tight.tokens < roomy.tokens
    assert tight.estimate_gib < roomy.estimate_gib


def test_an_explicit_checkpointing_choice_is_kept():
    fit = plan("--gradient_checkpointing true --per_device_train_batch_size 2 --gradient_accumulation_steps 4",
               h200()).fit
    assert fit.gradient_checkpointing is True
    fit = plan("--gradient_checkpointing false --auto_fit false", h200()).fit
    assert fit.gradient_checkpointing is False


def test_auto_fit_false_keeps_every_batch_setting_exactly():
    p = plan("--auto_fit false --per_device_train_batch_size 3 --gradient_accumulation_steps 5", h200())
    assert (p.fit.micro_batch, p.fit.accumulation, p.fit.gradient_checkpointing, p.fit.tokens) == (3, 5, True, None)
    assert "auto_fit false" in p.fit.reason


def test_when_nothing_fits_the_batch_is_left_as_given_and_the_reason_says_so():
    p = plan("--finetuning_type full --per_device_train_batch_size 2 --gradient_accumulation_steps 4", h200(24.0))
    assert (p.fit.micro_batch, p.fit.accumulation, p.fit.tokens) == (2, 4, None)
    assert "no layout" in p.fit.reason and "24.0 GiB" in p.fit.reason


def test_a_tiny_effective_batch_keeps_its_micro_batch_padding_free():
    """One sample per step cannot fill a row of the longest sample's length: the sample itself is the micro-batch."""
    p = plan("--per_device_train_batch_size 1 --gradient_accumulation_steps 1", h200())
    assert (p.fit.micro_batch, p.fit.accumulation, p.fit.tokens) == (1, 1, None)
    assert not p.fit.gradient_checkpointing


def test_backoff_halves_tokens_then_turns_checkpointing_on_then_gives_up():
    fit = Fit(1, 1, False, tokens=8192)
    steps = []
    while fit is not None:
        steps.append((fit.tokens, fit.accumulation, fit.gradient_checkpointing))
        fit = backoff(fit, longest=1024)
    assert steps == [(8192, 1, False), (4096, 2, False), (2048, 4, False), (1024, 8, False), (1024, 8, True)]
    unpacked = backoff(Fit(4, 2, True), longest=1024)
    assert (unpacked.micro_batch, unpacked.accumulation) == (2, 4)


def test_backoff_turns_checkpointing_on_first_when_every_layer_keeps_its_dequantized_4bit_experts():
    """Fewer tokens leave a 4-bit mixture of experts' dequantized experts (2.6 GiB a layer for Mixtral 8x7B) in
    memory until the backward pass; checkpointing keeps one layer's. Dense models and 16-bit experts keep the order."""
    mixtral = lookup("mixtral-8x7b").geometry
    fit = Fit(1, 1, False, tokens=8192)
    first = backoff(fit, longest=1024, shape=RunShape(mixtral, method="qlora-4bit", gradient_checkpointing=False))
    assert (first.tokens, first.accumulation, first.gradient_checkpointing) == (8192, 1, True)
    assert "dequantized experts" in first.reason
    assert backoff(first, longest=1024, shape=RunShape(mixtral, method="qlora-4bit")).tokens == 4096
    for shape in (RunShape(LLAMA2_7B, method="qlora-4bit"), RunShape(mixtral, method="qlora-8bit"),
                  RunShape(mixtral, method="lora"), None):
        assert backoff(fit, longest=1024, shape=shape) == backoff(fit, longest=1024)
    unpacked = backoff(Fit(4, 2, False), longest=1024, shape=RunShape(mixtral, method="qlora-4bit"))
    assert (unpacked.micro_batch, unpacked.accumulation, unpacked.gradient_checkpointing) == (4, 2, True)


def test_on_a_cpu_the_batch_is_kept_and_checkpointing_goes_off_when_ram_allows():
    shape = RunShape(LLAMA2_7B, batch_size=2, seq_len=1024, precision="fp32")
    assert fit_cpu(shape, 2, 4, None, available_gib=500.0).gradient_checkpointing is False
    assert fit_cpu(shape, 2, 4, None, available_gib=1.0).gradient_checkpointing is True
    assert fit_cpu(shape, 2, 4, True, available_gib=500.0).gradient_checkpointing is True
    kept = fit_cpu(shape, 2, 4, None, available_gib=500.0)
    assert (kept.micro_batch, kept.accumulation, kept.tokens) == (2, 4, None)


def test_fit_gpu_ranks_by_estimate_not_by_a_table():
    """The chosen layout's estimate is recomputed by the estimator itself (no separate numbers to drift)."""
    shape = shape_from_config(parse_args(["--quantization_bit", "4"]), LLAMA2_7B)
    fit = fit_gpu(shape, ALPACA, 8, 4, None, 80.0)
    from dataclasses import replace

    again = estimate(replace(shape, batch_size=1, seq_len=fit.tokens,
                             gradient_checkpointing=fit.gradient_checkpointing))
    assert again.total_gib == fit.estimate_gib


# --- the other speed features -------------------------------------------------------------------------------------


def test_every_feature_is_listed_with_its_reason():
    features = {f["feature"]: f for f in plan("", h200()).features()}
    assert set(features) == {"padding-free batches", "attention", "liger kernels", "loss", "auto-fit",
                             "gradient checkpointing"}
    assert all(f["why"] for f in features.values())
    assert features["liger kernels"]["on"] and features["padding-free batches"]["on"]
    assert features["attention"]["value"] == VARLEN and "varlen" in features["attention"]["why"]


def test_attention_follows_what_is_installed_and_asked():
    assert plan("", h200(flash=True)).attention == "flash_attention_2"
    assert plan("", h200()).attention == VARLEN
    assert plan("--padding_free false", h200()).attention == "sdpa"
    sdpa = plan("--flash_attn sdpa", h200())
    assert sdpa.attention == "sdpa" and "dense block-diagonal mask" in sdpa.attention_why
    assert "SDPA per sample" in plan("", CPU).attention_why


def test_liger_is_on_by_default_where_it_runs_and_refused_in_one_line_where_it_cannot():
    assert plan("", h200()).liger.on
    assert not plan("", CPU).liger.on and "no GPU" in plan("", CPU).liger.why
    assert not plan("--enable_liger_kernel false", h200()).liger.on
    assert "not installed" in plan("", h200(liger=None)).liger.why
    assert "no kernels for model type gpt2" in plan("", h200(), model_type="gpt2").liger.why
    for machine in (CPU, h200(liger=None)):
        with pytest.raises(UserError) as error:
            plan("--enable_liger_kernel true", machine)
        assert "enable_liger_kernel is true but" in str(error.value) and "\n" not in str(error.value)


def test_the_estimate_counts_liger_fused_loss_as_smaller_logits():
    shape = RunShape(LLAMA2_7B, batch_size=1, seq_len=8192)
    from dataclasses import replace

    assert estimate(replace(shape, fused_loss=True)).components["logits_and_loss"] < \
        estimate(shape).components["logits_and_loss"] / 2


def test_the_loss_is_liger_where_applied_trl_s_tiled_head_on_a_gpu_without_it_and_the_model_s_own_on_a_cpu():
    assert plan("", h200()).loss == "liger"
    assert plan("--enable_liger_kernel false", h200()).loss == "trl"
    assert plan("", CPU).loss == "model"


def test_padding_free_gives_way_where_it_would_change_what_is_trained():
    """Architectures that build their own masks would let joined samples see each other; NEFTune's noise is scaled
    by the row's length. Both train on padded batches, and say why."""
    legacy = plan("", h200(), traits=ModelTraits("falcon", attention_backend=False))
    assert not legacy.padding_free and "builds its own attention masks" in legacy.padding_free_why
    assert legacy.attention != VARLEN and not legacy.fit.tokens
    neftune = plan("--neftune_noise_alpha 5", h200())
    assert not neftune.padding_free and "NEFTune" in neftune.padding_free_why and not neftune.fit.tokens


def test_a_sliding_window_shorter_than_a_sample_keeps_transformers_masked_sdpa():
    from engine.models.attention import varlen_blocker

    assert varlen_blocker({"model_type": "mistral", "sliding_window": 4096}, 1024) is None
    blocker = varlen_blocker({"model_type": "mistral", "sliding_window": 512}, 1024)
    assert "sliding window (512 tokens)" in blocker
    assert varlen_blocker({"model_type": "qwen2", "sliding_window": 512, "use_sliding_window": False}, 1024) is None
    assert varlen_blocker({"model_type": "gemma2", "attn_logit_softcapping": 50.0}, 1024)
    windowed = plan("", h200(), traits=ModelTraits("mistral", varlen_blocker=blocker))
    assert windowed.padding_free and windowed.attention == "sdpa" and "dense block-diagonal" in windowed.attention_why


PAIRS = Lengths(mean=300.0, longest=1024)  # a prompt and its longer reply


@pytest.mark.parametrize("stage", ["--stage dpo", "--stage dpo --pref_loss orpo", "--stage kto", "--stage rm"])
@pytest.mark.parametrize("free_gib", [139.0, 40.0, 24.0])
def test_a_preference_or_reward_stage_gets_a_padded_layout_that_keeps_its_batch_exactly(stage, free_gib):
    """TRL pads each batch of pairs: auto-fit picks a micro-batch dividing the samples per step (the batch stays the
    user's to the sample), never packed rows, estimated at micro-batch x the longest pair; backoff halves it."""
    flags = f"{stage} --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --cutoff_len 1024"
    cfg = parse_args(f"--model_name_or_path meta-llama/Llama-2-7b-hf {flags}".split())
    p = plan_speed(cfg, h200(free_gib), PAIRS, ModelTraits("llama"), shape_from_config(cfg, LLAMA2_7B), pairs=True)
    fit = p.fit
    assert fit.tokens is None and fit.micro_batch * fit.accumulation == 32 and p.auto_fit
    assert not p.padding_free and not p.liger.on
    if fit.estimate_gib <= free_gib * (1 - MARGIN):
        assert fit.estimate_gib == pytest.approx(estimate(
            shape_from_config(parse_args(f"--model_name_or_path meta-llama/Llama-2-7b-hf {flags} "
                                         f"--per_device_train_batch_size {fit.micro_batch} --cutoff_len 1024 "
                                         f"--gradient_checkpointing {str(fit.gradient_checkpointing).lower()}"
                                         .split()), LLAMA2_7B)).total_gib, rel=1e-6)
    else:
        assert "the batch as given" in fit.reason
    if fit.micro_batch > 1:
        smaller = backoff(fit, PAIRS.longest)
        assert smaller.micro_batch == fit.micro_batch // 2 and smaller.micro_batch * smaller.accumulation == 32


def test_a_roomier_card_takes_a_larger_micro_batch_of_pairs_without_checkpointing():
    flags = "--stage dpo --per_device_train_batch_size 4 --gradient_accumulation_steps 8 --cutoff_len 1024"
    cfg = parse_args(f"--model_name_or_path meta-llama/Llama-2-7b-hf {flags}".split())
    roomy, tight = (plan_speed(cfg, h200(free), PAIRS, ModelTraits("llama"), shape_from_config(cfg, LLAMA2_7B),
                               pairs=True).fit for free in (139.0, 24.0))
    assert roomy.micro_batch > tight.micro_batch and not roomy.gradient_checkpointing
    assert tight.gradient_checkpointing
    cpu = plan_speed(cfg, CPU, PAIRS, ModelTraits("llama"), shape_from_config(cfg, LLAMA2_7B), pairs=True).fit
    assert (cpu.micro_batch, cpu.accumulation) == (4, 8)
    fixed = parse_args(f"--model_name_or_path meta-llama/Llama-2-7b-hf {flags} --auto_fit false".split())
    kept = plan_speed(fixed, h200(139.0), PAIRS, ModelTraits("llama"), shape_from_config(fixed, LLAMA2_7B),
                      pairs=True)
    assert (kept.fit.micro_batch, kept.fit.accumulation, kept.auto_fit) == (4, 8, False)
