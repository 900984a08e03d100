"""QLoRA on a mixture-of-experts model: the fused expert tensors are quantized to 4-bit too, and the whole path
(train, predict, chat) still runs on them."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import weakref

import pytest
import torch
from bitsandbytes.nn.parametrize import Bnb4bitParametrization
from safetensors import safe_open

from engine.cli import main
from engine.config.schema import parse_args
from engine.infer.chat import start_chat
from engine.memory.estimate import RunShape, dequantized_expert_bytes
from engine.models.catalog import lookup
from engine.models.loading import Precision, apply_method, count_parameters, load_model, quantization_config
from engine.models.moe_quant import fused_expert_parameters, held_bytes, quant_state, quantize_fused_experts
from engine.rundir import read_events

FP32 = Precision("fp32", "CPU")
EXPERT_TENSORS = 4  # tiny-mixtral: 2 layers x (gate_up_proj, down_proj)


def load(tiny_models, *args: str):
    cfg = parse_args(["--model_name_or_path", "tiny-mixtral", *args])
    return load_model(str(tiny_models["tiny-mixtral"]), cfg, FP32, "sdpa"), cfg


def experts_of(model) -> list:
    return [layer.mlp.experts for layer in model.model.layers]


def nf4_double_quantized_bytes(numel: int) -> int:
    """Packed 4-bit data, a uint8 absmax per 64-weight block, an fp32 absmax per 256 blocks, and the fixed tables:
    the 16-value NF4 code, the 256-value code of the absmax quantization, its offset (all fp32)."""
    return numel // 2 + numel // 64 + 4 * math.ceil(numel / 64 / 256) + 4 * (16 + 256 + 1)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class PeakStorage:
    """The peak bytes of the storages ``track`` was shown that were alive at once: a storage counts from the moment
    it is shown until it is freed, whichever tensors (views, parameters) hold it meanwhile."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.peak = 0

    def track(self, tensor) -> None:
        storage = tensor.untyped_storage()
        if id(storage) not in self.live:
            self.live[id(storage)] = storage.nbytes()
            weakref.finalize(storage, self.live.pop, id(storage))
            self.peak = max(self.peak, sum(self.live.values()))


class FusedExpertsInFloatingPoint(torch.overrides.TorchFunctionMode):
    """Every 3-D floating-point tensor torch makes while the mode is on (fused expert tensors, their stacked pieces),
    tracked by PeakStorage."""

    def __init__(self):
        super().__init__()
        self.storage = PeakStorage()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.ndim == 3 and out.is_floating_point() and out.device.type != "meta":
            self.storage.track(out)
        return out


@contextlib.contextmanager
def tuner_records(caplog):
    """tuner's log records into caplog once each, whether or not a run in this process made the logger stop
    propagating (caplog's handler also sits on the root logger)."""
    logger = logging.getLogger("tuner")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(scope="module")
def qlora_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "qlora"
    assert main(["train", "--model_name_or_path", "tiny-mixtral", "--dataset", "demo_alpaca", "--quantization_bit",
                 "4", "--lora_target", "all", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no",
                 "--per_device_train_batch_size", "4", "--output_dir", str(out)]) == 0
    return out


def test_4bit_loading_quantizes_fused_experts_through_bitsandbytes_parametrization(tiny_models, caplog):
    plain, _ = load(tiny_models)
    with tuner_records(caplog):
        model, _ = load(tiny_models, "--quantization_bit", "4")

    for experts in experts_of(model):
        for name in ("gate_up_proj", "down_proj"):
            assert any(isinstance(p, Bnb4bitParametrization) for p in experts.parametrizations[name])
            assert experts.parametrizations[name].original.dtype == torch.uint8
            assert getattr(experts, name).shape == getattr(experts_of(plain)[0], name).shape
            assert getattr(experts, name).dtype == torch.float32, "dequantized to the compute dtype"
            numel = math.prod(getattr(experts, name).shape)
            assert held_bytes(experts, name) == nf4_double_quantized_bytes(numel)
    assert not [(m, n) for m, n in fused_expert_parameters(model) if not hasattr(m, "parametrizations")]

    plain_experts = sum(p.numel() * 4 for p in plain.parameters() if p.ndim == 3)
    assert model_bytes(plain) - model_bytes(model) > 0.85 * plain_experts, "the experts' fp32 bytes are gone"
    assert count_parameters(model)[1] == count_parameters(plain)[1], "counted as the parameters they stand for"
    said = [r.getMessage() for r in caplog.records if "fused expert tensors" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"quantized {EXPERT_TENSORS} fused expert tensors to 4-bit: ")


def test_4bit_loading_holds_one_fused_expert_tensor_in_16_bit_at_a_time(tiny_models):
    """Each fused expert tensor is quantized as soon as its per-expert pieces are joined: at most its pieces and the
    joined tensor are alive in floating point, never the whole model's experts (on a GPU: Mixtral 8x7B's ~87 GiB)."""
    with FusedExpertsInFloatingPoint() as spy:
        model, _ = load(tiny_models, "--quantization_bit", "4")
    gate_up = math.prod(experts_of(model)[0].gate_up_proj.shape) * 4  # the largest, in the fp32 load dtype
    every_expert = sum(math.prod(getattr(e, n).shape) * 4 for e in experts_of(model) for n in ("gate_up_proj",
                                                                                                 "down_proj"))
    assert every_expert == 3 * gate_up
    assert 0 < spy.storage.peak <= 2 * gate_up, "one tensor's stacked pieces and the joined tensor, no more"
    assert not spy.storage.live


def test_experts_quantized_while_loading_match_those_quantized_after_loading(tiny_models):
    """The same packed data, statistics and logits as quantizing the loaded 16-bit experts, and transformers'
    own quantizer back in place once the load is over."""
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    model, cfg = load(tiny_models, "--quantization_bit", "4")
    assert AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is Bnb4BitHfQuantizer
    after = AutoModelForCausalLM.from_pretrained(str(tiny_models["tiny-mixtral"]), dtype=torch.float32,
                                                 quantization_config=quantization_config(cfg, FP32))
    assert len(fused_expert_parameters(after)) == EXPERT_TENSORS, "transformers alone leaves them in fp32"
    quantize_fused_experts(after, "nf4", double_quantization=True)
    for loaded, quantized in zip(experts_of(model), experts_of(after)):
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(loaded.parametrizations[name].original, quantized.parametrizations[name].original)
            assert torch.equal(quant_state(loaded, name).absmax, quant_state(quantized, name).absmax)
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, after(ids).logits)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dequantized_experts_held_through_backward_are_what_the_estimate_counts(tiny_models, checkpointing):
    """Autograd saves the dequantized expert tensors a layer multiplied with: without checkpointing every layer's
    (gate_up and down) stay until the backward pass, with it only the recomputed layer's are alive at once."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    model, cfg = load(tiny_models, "--quantization_bit", "4", "--lora_target", "all")
    model = apply_method(model, cfg, gradient_checkpointing=checkpointing)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    dequantized = PeakStorage()
    for module in model.modules():
        if isinstance(module, Bnb4bitParametrization):
            module.register_forward_hook(lambda _module, _args, out: dequantized.track(out))
    ids = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()

    shape = RunShape(lookup("tiny-mixtral").geometry, method="qlora-4bit", precision="fp32",
                     gradient_checkpointing=checkpointing)
    assert dequantized.peak == dequantized_expert_bytes(shape) > 0
    layer = sum(math.prod(getattr(experts_of(model.base_model.model)[0], n).shape) * 4
                for n in ("gate_up_proj", "down_proj"))
    assert dequantized.peak == (1 if checkpointing else 2) * layer
    assert not dequantized.live, "all freed after the backward pass"


def test_quantization_type_and_double_quantization_reach_the_experts(tiny_models):
    model, _ = load(tiny_models, "--quantization_bit", "4", "--quantization_type", "fp4",
                    "--double_quantization", "false")
    state = quant_state(experts_of(model)[0], "gate_up_proj")
    assert state.quant_type == "fp4" and not state.nested and state.dtype == torch.float32


def test_4bit_experts_compute_close_to_the_16_bit_ones(tiny_models):
    plain, _ = load(tiny_models)
    quantized, _ = load(tiny_models)
    quantize_fused_experts(quantized, "nf4", double_quantization=True)
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = plain(ids).logits, quantized(ids).logits
    assert not torch.equal(expected, got)
    assert torch.nn.functional.cosine_similarity(expected.flatten(), got.flatten(), dim=0) > 0.995
    assert (got - expected).norm() / expected.norm() < 0.1  # NF4 weights are ~9% off; measured 3.3% on the logits


def test_8bit_leaves_experts_in_the_load_dtype_and_says_so_once(tiny_models, caplog):
    with tuner_records(caplog):
        model, _ = load(tiny_models, "--quantization_bit", "8")
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.ndim == 3)
    said = [r.getMessage() for r in caplog.records if "fused expert tensors" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{EXPERT_TENSORS} fused expert tensors stay float32 under 8-bit")


def test_qlora_keeps_experts_packed_and_frozen_and_trains_with_gradient_checkpointing(tiny_models):
    model, cfg = load(tiny_models, "--quantization_bit", "4", "--lora_target", "all")
    model = apply_method(model, cfg, gradient_checkpointing=True)
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    originals = [e.parametrizations[n].original for e in experts_of(model.base_model.model)
                 for n in ("gate_up_proj", "down_proj")]
    assert all(p.dtype == torch.uint8 and not p.requires_grad for p in originals), "not upcast, not trained"

    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(loss.item())
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert not torch.nn.utils.parametrize._cache, "dequantized experts are not kept after the step"


def test_qlora_training_through_the_cli_saves_an_adapter_with_finite_loss(qlora_run):
    losses = [e["loss"] for e in read_events(qlora_run) if e["type"] == "log"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    with safe_open(qlora_run / "adapter_model.safetensors", "pt") as saved:
        keys = list(saved.keys())
    assert keys and all("lora_" in key and "experts" not in key for key in keys)
    assert json.loads((qlora_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    logged = (qlora_run / "train.log").read_text()
    assert logged.count(f"quantized {EXPERT_TENSORS} fused expert tensors to 4-bit: ") == 1


def test_predict_and_chat_reload_the_4bit_base_under_the_adapter(tiny_models, qlora_run, tmp_path):
    out = tmp_path / "predict"
    assert main(["predict", "--model_name_or_path", "tiny-mixtral", "--adapter_name_or_path", str(qlora_run),
                 "--quantization_bit", "4", "--dataset", "demo_alpaca", "--max_samples", "4",
                 "--per_device_eval_batch_size", "4", "--max_new_tokens", "4", "--output_dir", str(out)]) == 0
    assert len((out / "generated_predictions.jsonl").read_text().splitlines()) == 4

    session = start_chat(parse_args(["--model_name_or_path", "tiny-mixtral", "--adapter_name_or_path",
                                     str(qlora_run), "--quantization_bit", "4", "--max_new_tokens", "6"]))
    assert isinstance(session.reply("hello"), str)
    experts = session.inference.model.base_model.model.model.layers[0].mlp.experts
    assert torch.nn.utils.parametrize.is_parametrized(experts, "gate_up_proj")
