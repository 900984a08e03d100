"""``tuner doctor --gpu``: every path the engine can choose, run on this card and compared with the reference.

For each geometry (Llama-2-7B, Mistral-7B, Mixtral-8x7B: the real hidden size, heads, KV heads, head dim and
intermediate size, two decoder layers, random weights) one batch of samples of alpaca-like lengths goes through:

- the reference: fp32 weights and activations, padded batch, PyTorch SDPA, plain cross-entropy over the logits;
- each path: SDPA under bf16 and fp16 autocast; ``tuner_varlen`` on padding-free rows (torch's varlen kernel on a
  GPU); flash-attention-2 when installed; Liger's kernels and fused loss when installed; a QLoRA 4-bit model loaded
  as the engine loads it (its fp32 q/k/v reaching the varlen kernel); bitsandbytes' 4-bit and 8-bit linear layers
  at the geometry's sizes; Mixtral's fused experts quantized to 4-bit; an out-of-memory error and its recovery.

Each is compared on the loss and on a fingerprint of the gradients (engine.train.path_check) within stated
tolerances, and the model paths are timed against the classic path (padded SDPA under bf16 autocast). The checks
run on any device: ``tuner doctor --gpu`` runs them on each CUDA device; the tests run them on the CPU with a tiny
geometry, where the CUDA-only paths say so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger("tuner")

GEOMETRIES = ("llama2-7b", "mistral-7b-v0.1", "mixtral-8x7b")  # catalog names: their real geometry, 2 layers
LAYERS = 2
SAMPLE_LENGTHS = (96, 211, 57, 380, 143, 288, 75, 170)  # alpaca-like: prompt + reply, tokens
# The model paths are held to the start-of-run check's half-precision tolerance (engine.train.path_check); the
# bitsandbytes layers to these:
LINEAR_4BIT = {"output": 2e-2, "grads": 2e-2}  # against the dequantized weights in fp32
LINEAR_8BIT = {"output": 5e-2, "grads": 5e-2}  # LLM.int8 quantizes the inputs too
TIMED_REPEATS = 3


@dataclass(frozen=True)
class Outcome:
    """One path on one geometry: ``state`` passed / failed / not installed / not here."""

    path: str
    geometry: str
    state: str
    detail: str = ""
    loss_diff: float | None = None
    grads_diff: float | None = None
    speedup: float | None = None  # the classic path's time over this path's

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    def line(self) -> str:
        figures = []
        if self.loss_diff is not None:
            figures.append(f"loss {self.loss_diff:.1e}")
        if self.grads_diff is not None:
            figures.append(f"grads {self.grads_diff:.1e}")
        if self.speedup is not None:
            figures.append(f"{self.speedup:.2f}x the classic path")
        detail = "; ".join(figures + ([self.detail] if self.detail else []))
        return f"{self.state:<13} {self.path} ({self.geometry}){': ' + detail if detail else ''}"

    def to_json(self) -> dict:
        return {"path": self.path, "geometry": self.geometry, "state": self.state, "detail": self.detail,
                "loss_diff": self.loss_diff, "grads_diff": self.grads_diff, "speedup": self.speedup}


@dataclass
class Bench:
    """One geometry on one device: the model, its batches, the reference result and the classic path's time."""

    name: str
    config: object  # a transformers config, two layers
    device: object
    lengths: tuple[int, ...]
    workdir: Path
    model: object = None
    repeats: int = TIMED_REPEATS  # timed runs per path, after the warm-up (0: one run, no warm-up)
    samples: list = field(default_factory=list)
    reference: tuple | None = None
    classic_s: float | None = None

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def geometry_config(name: str, layers: int = LAYERS):
    """A transformers config with the catalog model's real geometry and ``layers`` decoder layers."""
    from transformers import AutoConfig

    from engine.models.catalog import lookup

    g = lookup(name).geometry
    experts = ({"num_local_experts": g.num_local_experts, "num_experts_per_tok": g.num_experts_per_tok}
               if g.num_local_experts else {})
    return AutoConfig.for_model(g.model_type, hidden_size=g.hidden_size, intermediate_size=g.intermediate_size,
                                num_hidden_layers=layers, num_attention_heads=g.num_attention_heads,
                                num_key_value_heads=g.num_key_value_heads, head_dim=g.head_dim,
                                vocab_size=g.vocab_size, max_position_embeddings=4096, pad_token_id=0,
                                tie_word_embeddings=g.tie_word_embeddings, use_cache=False, **experts)


def run_checks(benches: list[Bench], paths: list[Callable[[Bench], Outcome]] | None = None,
               progress: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Every path on every bench; a path that raises is a failure with its error, never the end of the check."""
    outcomes = []
    for bench in benches:
        for outcome in _bench_outcomes(bench, paths or PATHS):
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)
        bench.model = None
        _free(bench.device)
    return outcomes


def _bench_outcomes(bench: Bench, paths):
    """One bench's outcomes, as each path ends, on the bench's own CUDA device (its kernels launch there, and its
    synchronisations wait for it)."""
    import torch

    with torch.cuda.device(bench.device) if bench.on_cuda else contextlib.nullcontext():
        short = _memory_short(bench)
        if short:
            yield Outcome("every path", bench.name, "not here", short)
            return
        try:
            _prepare(bench)
        except Exception as exc:
            yield Outcome("the fp32 reference", bench.name, "failed", f"{type(exc).__name__}: {_first(exc)}")
            return
        for path in paths:
            try:
                outcome = path(bench)
            except Exception as exc:
                outcome = Outcome(_path_name(path), bench.name, "failed", f"{type(exc).__name__}: {_first(exc)}")
            _free(bench.device)  # what the path built is gone with its frame
            yield outcome


def _memory_short(bench: Bench) -> str | None:
    """Why this card has too little free memory for the bench (the fp32 model, its gradients and two copies), or
    None: a small card or a MIG slice is told so rather than failed."""
    if not bench.on_cuda:
        return None
    import torch

    from engine.models.catalog import model_geometry_from_config, param_count

    needed = param_count(model_geometry_from_config(bench.config.to_dict())) * 4 * 4 + 4 * 1024**3
    free, _ = torch.cuda.mem_get_info(bench.device)
    if free >= needed:
        return None
    return f"needs ~{needed / 1024**3:.0f} GiB free for its fp32 model, gradients and copies; {free / 1024**3:.0f} free"


def _prepare(bench: Bench) -> None:
    """The fp32 model, the samples, the reference result and the classic path's time."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.models.attention import register_varlen_attention

    register_varlen_attention()
    with torch.random.fork_rng(devices=[bench.device] if bench.on_cuda else []), bench.device:
        torch.manual_seed(0)  # initialised where it runs: a Mixtral's experts are 11 GB in fp32
        model = AutoModelForCausalLM.from_config(bench.config, attn_implementation="sdpa", dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    for length in bench.lengths:
        ids = torch.randint(4, bench.config.vocab_size, (length,), generator=generator).tolist()
        prompt = length // 3  # the prompt is not learned
        bench.samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    bench.model = model.train()
    for module in bench.model.modules():  # dropout off: every path computes the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    bench.reference = _run(bench, bench.model, "sdpa", padding_free=False, dtype=None)
    bench.classic_s = _time_run(bench, bench.model, "sdpa", False, torch.bfloat16)


# --- the paths -------------------------------------------------------------------------------------------------

def sdpa_bf16(bench: Bench) -> Outcome:
    import torch

    return _model_path(bench, "SDPA, bf16 autocast, padded", "sdpa", False, torch.bfloat16)


def sdpa_fp16(bench: Bench) -> Outcome:
    import torch

    return _model_path(bench, "SDPA, fp16 autocast, padded", "sdpa", False, torch.float16)


def varlen_bf16(bench: Bench) -> Outcome:
    import torch

    from engine.models.attention import VARLEN, torch_varlen_available

    kernel = "torch's varlen kernel" if bench.on_cuda and torch_varlen_available() else "SDPA per sample"
    return _model_path(bench, f"{VARLEN} ({kernel}), bf16 autocast, padding-free", VARLEN, True, torch.bfloat16)


def flash_attention_2(bench: Bench) -> Outcome:
    import importlib.util

    import torch

    name = "flash-attention-2, bf16 autocast, padding-free"
    if importlib.util.find_spec("flash_attn") is None:
        return Outcome(name, bench.name, "not installed", "pip install flash-attn")
    if not bench.on_cuda:
        return Outcome(name, bench.name, "not here", "CUDA only")
    return _model_path(bench, name, "flash_attention_2", True, torch.bfloat16)


def liger(bench: Bench) -> Outcome:
    """Liger's kernels patched into a copy of the model. They also replace names in the architecture's modeling
    module (its RoPE function, its RMSNorm and MLP classes), for the whole process: those are put back afterwards, so
    the benches after this one build their models unpatched."""
    import copy
    import sys

    import torch

    from engine.models.attention import VARLEN
    from engine.models.kernels import apply_liger, liger_model_types

    name = "Liger kernels + fused loss, bf16 autocast, padding-free"
    types = liger_model_types()
    if types is None:
        return Outcome(name, bench.name, "not installed", "pip install liger-kernel")
    if not bench.on_cuda:
        return Outcome(name, bench.name, "not here", "Triton kernels: CUDA only")
    if bench.config.model_type not in types:
        return Outcome(name, bench.name, "not here", f"no kernels for {bench.config.model_type}")
    patched = copy.deepcopy(bench.model)
    architecture = type(bench.model)
    modeling = sys.modules[architecture.__module__]
    names, forward = dict(vars(modeling)), architecture.__dict__.get("forward")
    try:
        apply_liger(patched)
        return _model_path(bench, name, VARLEN, True, torch.bfloat16, model=patched, fused_loss=True)
    finally:
        for key in set(vars(modeling)) - set(names):
            delattr(modeling, key)
        for key, value in names.items():
            if vars(modeling).get(key) is not value:
                setattr(modeling, key, value)
        if forward is not None and architecture.__dict__.get("forward") is not forward:
            architecture.forward = forward  # older liger-kernel releases patch the class itself


def qlora_4bit_varlen(bench: Bench) -> Outcome:
    """A QLoRA 4-bit model loaded and prepared as the engine does it (fp32 norms and embeddings, so fp32 q/k/v reach
    attention): padding-free rows through tuner_varlen against padded SDPA on the same quantized model."""
    import torch

    from engine.config.schema import parse_args
    from engine.models.attention import VARLEN
    from engine.models.loading import Precision, apply_method, load_model

    name = "QLoRA 4-bit (fp32 q/k/v into tuner_varlen), bf16 autocast, padding-free"
    if getattr(bench.config, "num_local_experts", 0):
        return Outcome(name, bench.name, "not here", "checked on the dense geometries")
    saved = bench.workdir / f"{bench.name}-fp32"
    if not saved.exists():
        bench.model.save_pretrained(saved)
    cfg = parse_args(["--model_name_or_path", str(saved), "--finetuning_type", "lora", "--quantization_bit", "4",
                      "--lora_target", "all", "--output_dir", str(bench.workdir / "unused")])
    device_map = {"": bench.device.index or 0} if bench.on_cuda else None
    model = load_model(str(saved), cfg, Precision("bf16", "selftest"), VARLEN, device_map)
    model = apply_method(model, cfg, gradient_checkpointing=False)
    model.train()
    classic = _run(bench, model, "sdpa", padding_free=False, dtype=torch.bfloat16)
    fast = _run(bench, model, VARLEN, padding_free=True, dtype=torch.bfloat16)
    fast_s = _time_run(bench, model, VARLEN, True, torch.bfloat16)
    classic_s = _time_run(bench, model, "sdpa", False, torch.bfloat16)
    return _compare(bench, name, fast, classic, classic_s / fast_s)


def linear_4bit(bench: Bench) -> Outcome:
    """bitsandbytes' NF4 linear layer (hidden -> intermediate) forward and backward against the same weights
    dequantized, in fp32."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    def make(weight):
        layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
        layer = layer.to(bench.device)
        return layer, dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()

    return _linear_path(bench, "bitsandbytes 4-bit linear (NF4), forward and backward", make, LINEAR_4BIT)


def linear_8bit(bench: Bench) -> Outcome:
    """bitsandbytes' LLM.int8 linear layer forward and backward against the int8 weights dequantized, in fp32."""
    import bitsandbytes as bnb
    import torch

    def make(weight):
        layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.cpu().half(), requires_grad=False, has_fp16_weights=False)
        layer = layer.to(bench.device)
        scale = layer.weight.SCB.float().to(bench.device)
        return layer, layer.weight.data.float() * scale[:, None] / 127

    return _linear_path(bench, "bitsandbytes 8-bit linear (LLM.int8), forward and backward", make, LINEAR_8BIT,
                        dtype=torch.float16)


def mixtral_experts_4bit(bench: Bench) -> Outcome:
    """Mixtral's fused expert tensors quantized to 4-bit (engine.models.moe_quant) against the same model with the
    dequantized experts as plain weights: the quantization's forward and backward, not its rounding."""
    import copy

    import torch

    from engine.models import moe_quant

    name = "Mixtral fused experts in 4-bit, bf16 autocast, padded"
    if not getattr(bench.config, "num_local_experts", 0):
        return Outcome(name, bench.name, "not here", "a dense geometry")
    quantized = copy.deepcopy(bench.model)
    moe_quant.quantize_fused_experts(quantized, "nf4", True)
    plain = copy.deepcopy(bench.model)
    names = {id(module): name for name, module in plain.named_modules()}
    twins = dict(quantized.named_modules())
    for module, param_name in moe_quant.fused_expert_parameters(plain):
        param = getattr(module, param_name)
        with torch.no_grad():  # the weights the quantized forward computes with, as plain (frozen) weights
            param.copy_(getattr(twins[names[id(module)]], param_name).float())
        param.requires_grad_(False)
    reference = _run(bench, plain, "sdpa", padding_free=False, dtype=torch.bfloat16)
    fast = _run(bench, quantized, "sdpa", padding_free=False, dtype=torch.bfloat16)
    fast_s = _time_run(bench, quantized, "sdpa", False, torch.bfloat16)
    plain_s = _time_run(bench, plain, "sdpa", False, torch.bfloat16)
    return _compare(bench, name, fast, reference, plain_s / fast_s)


def out_of_memory_recovery(bench: Bench) -> Outcome:
    """What the run's out-of-memory back-off stands on, on this card: an allocation over the limit raises
    torch.OutOfMemoryError (which the back-off catches), the memory is given back, the peak statistics reset, and a
    smaller allocation succeeds within the limit. The back-off's own logic is tested on the CPU."""
    import torch

    name = "out-of-memory error and recovery (CUDA allocator)"
    if not bench.on_cuda:
        return Outcome(name, bench.name, "not here", "CUDA only")
    free, total = torch.cuda.mem_get_info(bench.device)
    used = torch.cuda.memory_allocated(bench.device)
    fraction = min(1.0, (used + 2 * 1024**3) / total)  # 2 GiB more than this process holds now
    torch.cuda.set_per_process_memory_fraction(fraction, bench.device)
    try:
        try:
            too_big = torch.empty(4 * 1024**3, dtype=torch.uint8, device=bench.device)
            del too_big
            return Outcome(name, bench.name, "failed", "a 4 GiB allocation over a 2 GiB limit did not fail")
        except torch.OutOfMemoryError:
            pass
        _free(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        smaller = torch.empty(1024**3, dtype=torch.uint8, device=bench.device)
        peak = torch.cuda.max_memory_allocated(bench.device)
        del smaller
        if peak > used + 1.5 * 1024**3:
            return Outcome(name, bench.name, "failed", f"peak after the reset {peak / 1024**3:.1f} GiB")
        return Outcome(name, bench.name, "passed", "out of memory raised, freed, peak reset, smaller attempt ran")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, bench.device)
        _free(bench.device)


PATHS = [sdpa_bf16, sdpa_fp16, varlen_bf16, flash_attention_2, qlora_4bit_varlen, linear_4bit, linear_8bit,
         mixtral_experts_4bit, out_of_memory_recovery, liger]


# --- the machinery ---------------------------------------------------------------------------------------------

def _model_path(bench: Bench, name: str, attention: str, padding_free: bool, dtype, model=None,
                fused_loss: bool = False) -> Outcome:
    model = bench.model if model is None else model
    result = _run(bench, model, attention, padding_free, dtype, fused_loss)
    seconds = _time_run(bench, model, attention, padding_free, dtype, fused_loss)
    return _compare(bench, name, result, bench.reference, bench.classic_s / seconds)


def _compare(bench: Bench, name: str, result, reference, speedup: float | None) -> Outcome:
    """The start-of-run check's comparison (engine.train.path_check.compare), at its half-precision tolerance."""
    from engine.train.path_check import compare

    found = compare(name, result, reference, "bf16")
    return Outcome(name, bench.name, "passed" if found.passed else "failed", "" if found.passed else found.why,
                   found.loss_diff, found.grads_diff, speedup)


def _run(bench: Bench, model, attention: str, padding_free: bool, dtype, fused_loss: bool = False,
         with_fingerprint: bool = True):
    """One forward and backward of the bench's samples through ``model``: (loss, gradient fingerprint)."""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from engine.train.loss import learned_token_loss
    from engine.train.path_check import fingerprint, padded, set_attention

    row = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(bench.samples)
    batch = row if padding_free else padded(row, 0)
    batch = {k: v.to(bench.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    learned = int((batch["labels"][..., 1:] != -100).sum())
    set_attention(model, attention)
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast(bench.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        if fused_loss:
            loss = model(**batch, num_items_in_batch=learned).loss
        else:
            loss = learned_token_loss(model, batch, learned)[0]
    loss.backward()
    found = (float(loss.detach().float()), fingerprint(model) if with_fingerprint else [])
    model.zero_grad(set_to_none=True)
    return found


def _linear_path(bench: Bench, name: str, make, tolerance: dict, dtype=None) -> Outcome:
    import torch

    hidden, intermediate = bench.config.hidden_size, bench.config.intermediate_size
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(intermediate, hidden, generator=generator) / math.sqrt(hidden)
    inputs = torch.randn(sum(bench.lengths[:2]), hidden, generator=generator).to(bench.device)
    layer, dequantized = make(weight)
    x = inputs.clone().to(dtype or torch.float32).requires_grad_()
    out = layer(x)
    out.float().square().mean().backward()
    x_ref = inputs.clone().requires_grad_()
    ref = x_ref @ dequantized.T
    ref.square().mean().backward()
    output_diff = float((out.detach().float() - ref.detach()).norm() / ref.detach().norm())
    grads_diff = float((x.grad.float() - x_ref.grad).norm() / x_ref.grad.norm())
    failed = [f"{what} over {tolerance[what]:.0e}" for what, diff in (("output", output_diff), ("grads", grads_diff))
              if not math.isfinite(diff) or diff > tolerance[what]]
    detail = f"output {output_diff:.1e}, input grads {grads_diff:.1e}" + (f"; {', '.join(failed)}" if failed else "")
    return Outcome(name, bench.name, "failed" if failed else "passed", detail)


def _time_run(bench: Bench, model, attention: str, padding_free: bool, dtype, fused_loss: bool = False) -> float:
    return _timed(lambda: _run(bench, model, attention, padding_free, dtype, fused_loss, False),
                  bench.repeats)


def _timed(work: Callable[[], object], repeats: int) -> float:
    """``work``'s median time over ``repeats`` runs after one warm-up (kernel compilation and autotuning are not
    timed); ``repeats`` 0 times one run, warm-up and all (the tests' speed-up figures mean nothing anyway)."""
    import torch

    if repeats:
        work()
    times = []
    for _ in range(max(repeats, 1)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


def _path_name(path) -> str:
    return path.__name__.replace("_", " ")


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cuda_benches(workdir: Path, names: tuple[str, ...] = GEOMETRIES) -> list[Bench]:
    """A bench per geometry on each visible CUDA device; ``workdir`` holds the models saved for the QLoRA path."""
    import torch

    return [Bench(name, geometry_config(name), torch.device("cuda", index), SAMPLE_LENGTHS, workdir)
            for index in range(torch.cuda.device_count()) for name in names]


def with_device(bench: Bench, device) -> Bench:
    return replace(bench, device=device, samples=[], model=None, reference=None, classic_s=None)
