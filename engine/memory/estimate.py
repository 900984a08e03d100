"""Peak GPU memory of a fine-tuning run, per component, from the model's geometry alone (no weights loaded).

The estimate models what the engine does (engine/models/loading.py, engine/train/): which weights stay 16-bit, which are
quantized or kept in fp32, what the optimizer holds, and what the forward and backward passes keep alive. Three
constants come from measurement rather than first principles; each says where it was measured, and
``tests/unit/test_memory.py`` holds the whole estimate to the measured table in ``bench/results``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from engine.models.catalog import ModelGeometry

GIB = 1024**3

# Measured on an H200 with torch 2.11, transformers 5.17, bitsandbytes 0.50 (bench/results/README.md):
ACT_BYTES_PER_HIDDEN = 28.0  # activations one decoder layer keeps per token, per hidden unit (no checkpointing)
ACT_BYTES_PER_INTERMEDIATE = 8.0  # ... and per MLP intermediate unit (gate, up, activation, product in 16-bit)
LOGIT_BYTES_PER_VOCAB = 3.3  # logits and loss buffers per token per vocabulary entry (TRL's loss, 16-bit head)
CUDA_CONTEXT_GIB = 1.35  # CUDA context + kernels outside torch's allocator (NVML used minus reserved)
ALLOCATOR_FACTOR, ALLOCATOR_GIB = 1.06, 0.25  # torch's reserved = allocated x factor + constant (fragmentation)

OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2.0, "sgd": 0.0, "adafactor": 1.0}
METHODS = ("full", "freeze", "lora", "qlora-8bit", "qlora-4bit")  # highest quality first


@dataclass(frozen=True)
class RunShape:
    """Everything about a run that decides its memory: the model, the method, the batch and the parallelism."""

    geometry: ModelGeometry
    method: str = "lora"  # one of METHODS
    batch_size: int = 1
    seq_len: int = 1024
    gradient_checkpointing: bool = True
    attention: str = "sdpa"  # sdpa | flash_attention_2 | eager
    lora_rank: int = 8
    lora_target: str = "all"
    freeze_trainable_layers: int = 2
    optim: str = "adamw_torch"
    double_quantization: bool = True
    precision: str = "bf16"  # bf16 | fp16 | fp32 | pure_bf16 (bfloat16 weights, gradients and states, no autocast)
    num_gpus: int = 1
    sharding: str = "ddp"  # ddp | zero2 | zero3 (FSDP full_shard counts as zero3)
    offload: bool = False  # CPU offload: zero2 moves optimizer states and fp32 masters, zero3 also the weights
    fused_loss: bool = False  # Liger's fused linear cross-entropy (not yet measured); else TRL's tiled LM head
    pairs: bool = False  # stages dpo and rm: chosen and rejected in one forward (twice the batch)
    reference: bool = False  # a preference stage's frozen reference (dpo but ORPO and SimPO, kto)
    reference_model: bool = False  # ref_model given: a whole model as the reference, even with LoRA
    reference_bits: int | None = None  # ref_model_quantization_bit
    reference_precomputed: bool = False  # precompute_ref_log_probs: no reference held in training (no ref_model)
    reward: bool = False  # stage rm: a one-output score head in place of the LM head (no vocabulary-wide logits)

    @property
    def quantization_bit(self) -> int | None:
        return {"qlora-8bit": 8, "qlora-4bit": 4}.get(self.method)

    @property
    def finetuning_type(self) -> str:
        return "lora" if self.method.startswith("qlora") else self.method


def method_of(finetuning_type: str, quantization_bit: int | None) -> str:
    return f"qlora-{quantization_bit}bit" if quantization_bit else finetuning_type


@dataclass
class Estimate:
    """GiB per component for one GPU; ``peak_allocated_gib`` is torch.cuda.max_memory_allocated's figure,
    ``total_gib`` what nvidia-smi shows (allocator reserve and CUDA context included)."""

    method: str
    components: dict[str, float]
    peak_allocated_gib: float
    total_gib: float
    trainable_params: int
    assumptions: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


# --- the model's parameters, grouped the way the methods treat them ------------------------------------------------


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def decoder_linears(g: ModelGeometry) -> list[Linear]:
    """The ``nn.Linear`` layers of one decoder layer. Mixture-of-experts layers keep their experts as fused 3-D
    tensors in transformers 5 (not Linear: no LoRA; only 4-bit QLoRA quantizes them) and their router is left out of
    LoRA."""
    q, kv = g.num_attention_heads * g.head_dim, g.num_key_value_heads * g.head_dim
    layers = [Linear("q_proj", g.hidden_size, q), Linear("k_proj", g.hidden_size, kv),
              Linear("v_proj", g.hidden_size, kv), Linear("o_proj", q, g.hidden_size)]
    if not g.num_local_experts:
        layers += [Linear("gate_proj", g.hidden_size, g.intermediate_size),
                   Linear("up_proj", g.hidden_size, g.intermediate_size),
                   Linear("down_proj", g.intermediate_size, g.hidden_size)]
    return layers


def layer_other_params(g: ModelGeometry) -> int:
    """Per decoder layer, the parameters outside its Linear layers: norms, biases, experts and router."""
    q, kv = g.num_attention_heads * g.head_dim, g.num_key_value_heads * g.head_dim
    other = g.norms_per_layer * g.hidden_size
    if g.qkv_bias:
        other += q + 2 * kv
    if g.o_bias:
        other += g.hidden_size
    if g.num_local_experts:
        other += expert_params(g) + g.hidden_size * g.num_local_experts
    return other


def expert_params(g: ModelGeometry) -> int:
    """Per decoder layer, the parameters of the fused expert tensors (gate, up and down of every expert)."""
    return g.num_local_experts * 3 * g.hidden_size * g.intermediate_size


def embedding_params(g: ModelGeometry, reward: bool = False) -> int:
    """Input embeddings and the output head (one matrix when tied; a reward model's one-output score head in its
    place), plus the final norm."""
    if reward:
        return g.vocab_size * g.hidden_size + 2 * g.hidden_size
    return g.vocab_size * g.hidden_size * (1 if g.tie_word_embeddings else 2) + g.hidden_size


def lora_targets(g: ModelGeometry, lora_target: str) -> list[Linear]:
    linears = decoder_linears(g)
    if lora_target.strip() == "all":
        return linears
    names = {t.strip() for t in lora_target.split(",")}
    return [linear for linear in linears if linear.name in names]


# Families whose decoder layers use Llama's Linear names (q/k/v/o_proj, gate/up/down_proj): the names below are theirs.
NAMED_LIKE_LLAMA = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")


def linear_names(g: ModelGeometry) -> list[str]:
    """The short names LoRA targets can use for this model (what ``lora_target: all`` wraps)."""
    return [linear.name for linear in decoder_linears(g)]


def asked_targets(lora_target: str, available: list[str]) -> tuple[list[str], list[str]]:
    """The module names a comma list asks for, and those of them that are not in ``available``."""
    asked = [t.strip() for t in lora_target.split(",") if t.strip()]
    return asked, [t for t in asked if t not in available]


def lora_target_problem(g: ModelGeometry, lora_target: str) -> str | None:
    """Why ``lora_target`` would be refused for this model, or None: the check engine.models.loading makes on the loaded
    model, made on the geometry so a config can be checked before anything loads."""
    if lora_target.strip() == "all" or g.model_type not in NAMED_LIKE_LLAMA:
        return None  # another family's names (phi3's qkv_proj, ...) are checked once the model is loaded
    available = linear_names(g)
    asked, missing = asked_targets(lora_target, available)
    if not asked:
        return "lora_target is empty: give module names (comma separated) or all"
    if missing:
        return (f"lora_target {', '.join(missing)} not found in this model; its linear layers are: "
                f"{', '.join(available)}; or use all")
    return None


def lora_params(g: ModelGeometry, rank: int, lora_target: str) -> int:
    return g.num_hidden_layers * sum(rank * (t.in_features + t.out_features) for t in lora_targets(g, lora_target))


# --- the estimate ----------------------------------------------------------------------------------------------


def _optimizer_kind(optim: str) -> str:
    if "8bit" in optim:
        return "adamw_8bit"
    if optim.startswith("sgd"):
        return "sgd"
    if optim.startswith("adafactor"):
        return "adafactor"
    return "adamw"


def estimate(shape: RunShape) -> Estimate:
    """Peak memory on one GPU for ``shape``, by component, with the assumptions it rests on."""
    g = shape.geometry
    layers = g.num_hidden_layers
    linear_params = layers * sum(linear.params for linear in decoder_linears(g))
    other_params = layers * layer_other_params(g) + embedding_params(g, shape.reward)
    w16 = 4.0 if shape.precision == "fp32" else 2.0
    pure = shape.precision == "pure_bf16"
    trained = 2.0 if pure else 4.0  # bytes per trained weight and its gradient: fp32 masters, or bf16 with pure_bf16
    weights = "bfloat16 weights, gradients and optimizer states, no autocast" if pure else \
        f"{shape.precision} weights and autocast"
    assumptions = [f"{weights}, {shape.attention} attention, "
                   f"gradient checkpointing {'on' if shape.gradient_checkpointing else 'off'}"]
    components: dict[str, float] = {}
    bits = shape.quantization_bit

    # Weights: 16-bit unless quantized (QLoRA: Linear layers, and fused experts at 4 bits) or trained (fp32 masters).
    if bits:
        per_param = _quantized_bytes(shape)
        experts = layers * expert_params(g)
        quantized_experts = experts if bits == 4 else 0
        components["weights_quantized"] = (linear_params + quantized_experts) * per_param
        # k-bit preparation keeps the weights it does not quantize in fp32; 8-bit leaves fused experts 16-bit.
        components["weights_16bit"] = (other_params - experts) * 4.0 + (experts - quantized_experts) * w16
        assumptions.append(f"{bits}-bit Linear layers; embeddings, head and norms upcast to fp32 by k-bit preparation")
        if g.num_local_experts and bits == 4:
            assumptions.append("mixture-of-experts weights (fused expert tensors) quantized to 4-bit NF4 like the "
                               "Linear layers")
        elif g.num_local_experts:
            assumptions.append("mixture-of-experts weights (fused expert tensors) stay 16-bit: bitsandbytes has no "
                               "8-bit path for parameters outside Linear layers")
        if bits == 8:
            assumptions.append(INT8_KEPT_INPUTS)
    trainable = _trainable_params(shape, linear_params, other_params)
    frozen = linear_params + other_params - trainable if shape.finetuning_type != "lora" else 0
    if shape.finetuning_type == "lora":
        if not bits:
            components["weights_16bit"] = (linear_params + other_params) * w16
        components["lora_adapters"] = trainable * trained
    else:
        components["weights_16bit"] = frozen * w16
        components["weights_trainable_bf16" if pure else "weights_trainable_fp32"] = trainable * trained
    components["gradients"] = trainable * trained
    kind = _optimizer_kind(shape.optim)
    state_bytes = OPTIMIZER_STATE_BYTES[kind] / 2 if pure and kind == "adamw" else OPTIMIZER_STATE_BYTES[kind]
    components["optimizer_states"] = trainable * state_bytes
    assumptions.append(f"optimizer {shape.optim}: {state_bytes:g} bytes of state per trainable parameter")

    _shard(shape, components, assumptions, trainable)
    if shape.reference:
        _reference(shape, components, assumptions, linear_params + other_params, trainable, w16)
    if shape.reward:
        assumptions.append("reward model: chosen and rejected in one forward (twice the batch), a one-output score "
                           "head trained whole in place of the LM head (not yet measured on a GPU)")
    elif shape.pairs:
        assumptions.append("preference pairs: chosen and rejected in one forward (twice the batch), their logits "
                           "counted as for supervised fine-tuning (not yet measured on a GPU)"
                           + ("" if shape.reference else "; no reference model (ORPO, SimPO)"))

    # a pair: both replies in one forward, through TRL's tiled LM head as SFT's (not yet measured on a GPU)
    activations, logits = _activation_bytes(replace(shape, batch_size=2 * shape.batch_size) if shape.pairs else shape)
    components["activations"] = activations
    components["logits_and_loss"] = logits
    if bits:
        biggest = max(linear.params for linear in decoder_linears(g))
        # the backward pass dequantizes one Linear weight at a time: 4-bit to the 16-bit compute dtype, 8-bit to its
        # input's dtype, fp32 after k-bit preparation
        components["dequantized_layer"] = biggest * (4.0 if bits == 8 else 2.0)
    if experts_kept := dequantized_expert_bytes(shape):
        components["dequantized_experts"] = experts_kept
        assumptions.append(DEQUANTIZED_EXPERTS_KEPT if not shape.gradient_checkpointing else
                           "the 4-bit fused experts of the layer being recomputed held dequantized in its backward")
    if bits == 8:
        components["int8_kept_inputs"] = shape.batch_size * shape.seq_len * int8_kept_input_bytes(shape)
    components["autocast_weight_copies"] = _autocast_copies(shape, trainable, other_params)
    optimizer_step = trainable * trained if kind == "adamw" and "fused" not in shape.optim and not offloads(shape) \
        else 0.0
    components["optimizer_step_temporaries"] = optimizer_step

    transient_keys = ("activations", "logits_and_loss", "dequantized_layer", "dequantized_experts",
                      "int8_kept_inputs", "autocast_weight_copies")
    static = sum(v for k, v in components.items() if k not in transient_keys + ("optimizer_step_temporaries",))
    forward_backward = sum(components.get(k, 0.0) for k in transient_keys)
    peak = static + max(forward_backward, optimizer_step)
    assumptions.append("forward/backward buffers and the optimizer step's temporaries do not overlap: the peak is "
                       "the larger of the two on top of weights, gradients and optimizer states")
    loading = _loading_bytes(shape, linear_params, other_params, w16)
    if loading > peak:
        assumptions.append(f"the peak is while the model loads ({loading / GIB:.2f} GiB, training's "
                           f"{peak / GIB:.2f} GiB): {LOADING}")
        peak = loading
    total = peak * ALLOCATOR_FACTOR + ALLOCATOR_GIB * GIB + CUDA_CONTEXT_GIB * GIB
    components["allocator_reserve"] = total - peak - CUDA_CONTEXT_GIB * GIB
    components["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return Estimate(
        method=shape.method, components={k: round(v / GIB, 3) for k, v in components.items()},
        peak_allocated_gib=round(peak / GIB, 3), total_gib=round(total / GIB, 3), trainable_params=trainable,
        assumptions=assumptions,
    )


def _quantized_bytes(shape: RunShape) -> float:
    """Bytes per quantized weight: 4-bit NF4 with its block scales (themselves quantized with double quantization),
    or 8-bit."""
    if shape.quantization_bit == 8:
        return 1.0
    return 0.5 + (1 / 64 + 4 / (64 * 256) if shape.double_quantization else 4 / 64)


def _trainable_params(shape: RunShape, linear_params: int, other_params: int) -> int:
    g = shape.geometry
    head = g.hidden_size if shape.reward else 0  # a reward model's score head trains whole with LoRA and freeze
    if shape.finetuning_type == "lora":
        return lora_params(g, shape.lora_rank, shape.lora_target) + head
    if shape.finetuning_type == "full":
        return linear_params + other_params
    count = min(abs(shape.freeze_trainable_layers), g.num_hidden_layers)
    return count * (sum(linear.params for linear in decoder_linears(g)) + layer_other_params(g)) + head


def _shard(shape: RunShape, components: dict, assumptions: list[str], trainable: int) -> None:
    """Divide what ZeRO / FSDP shards across GPUs and take off what CPU offload moves; DDP keeps a full copy plus
    gradient buckets on each."""
    n = shape.num_gpus
    if n <= 1 and not offloads(shape):
        return
    if shape.sharding == "ddp":
        components["ddp_gradient_buckets"] = trainable * 4.0
        assumptions.append(f"DDP on {n} GPUs: each holds the whole model and a bucket copy of the gradients")
        return
    sharded = ["gradients", "optimizer_states"]
    weights = [k for k in components if k.startswith("weights") or k == "lora_adapters"]
    if shape.sharding == "zero3":
        sharded += weights
    for key in sharded:
        components[key] = components[key] / n
    if shape.sharding == "zero3":
        g = shape.geometry
        gathered = (sum(linear.params for linear in decoder_linears(g)) + layer_other_params(g)) * 2.0
        components["gathered_layer"] = gathered
    assumptions.append(f"{shape.sharding.upper()} over {n} GPU{'s' if n != 1 else ''} shards {', '.join(sharded)}")
    if offloads(shape):
        _offload(shape, components, assumptions, weights)


def offloads(shape: RunShape) -> bool:
    """Whether CPU offload applies: it is a ZeRO / FSDP option, DDP has none."""
    return shape.offload and shape.sharding != "ddp"


def _offload(shape: RunShape, components: dict, assumptions: list[str], weights: list[str]) -> None:
    """CPU offload: the optimizer states and fp32 master weights live in CPU memory (the step runs there); under
    ZeRO-3 / FSDP the weights too, only the gathered layer stays on the GPU."""
    moved = components["optimizer_states"]
    components["optimizer_states"] = 0.0
    what = ["optimizer states"]
    if shape.sharding == "zero3":
        for key in weights:
            moved += components[key]
            components[key] = 0.0
        what.append("weights")
    elif shape.precision != "pure_bf16":
        master = "lora_adapters" if "lora_adapters" in components else "weights_trainable_fp32"
        moved += components[master] / 2  # the fp32 master goes, a 16-bit working copy stays
        components[master] /= 2
        if master != "lora_adapters":
            components["weights_trainable_16bit"] = components.pop(master)
        what.append("fp32 master weights")
    assumptions.append(f"CPU offload: {' and '.join(what)} in CPU memory (about {moved / GIB:.1f} GiB per process), "
                       "the optimizer step on the CPU")


def _reference(shape: RunShape, components: dict, assumptions: list, params: int, trainable: int,
               w16: float) -> None:
    """A preference stage's reference: with LoRA, TRL's frozen copy of the adapter as it starts; else the model
    loaded a second time in the training precision (sharded like the weights under ZeRO-3). Its forward runs
    without gradients, inside the training forward's peak (so does KTO's forward of the mismatched replies)."""
    if shape.reference_precomputed and not shape.reference_model:
        assumptions.append("the reference's log-probabilities computed once before training "
                           "(precompute_ref_log_probs): no reference held while training")
        return
    if shape.reference_model:
        per_param = {4: 0.5 + 1 / 64, 8: 1.0}.get(shape.reference_bits, w16)  # 4-bit: NF4 with its block scales
        components["reference_model"] = params * per_param / (shape.num_gpus if shape.sharding == "zero3" else 1)
        bits = f"in {shape.reference_bits} bits" if shape.reference_bits else "in the training precision"
        reference = f"ref_model, counted as large as the model trained, {bits}, frozen"
    elif shape.finetuning_type == "lora":
        components["reference_adapter"] = trainable * w16
        reference = "a frozen copy of the adapter"
    else:
        components["reference_model"] = params * w16 / (shape.num_gpus if shape.sharding == "zero3" else 1)
        reference = "the model loaded again in the training precision, frozen"
    assumptions.append(f"the reference is {reference}, its log-probabilities through TRL's tiled LM head")


def _activation_bytes(shape: RunShape) -> tuple[float, float]:
    """What the forward pass keeps for the backward pass, and the logits and loss buffers."""
    g = shape.geometry
    tokens = shape.batch_size * shape.seq_len
    intermediate = g.intermediate_size * (g.num_experts_per_tok or 1)
    per_layer = ACT_BYTES_PER_HIDDEN * g.hidden_size + ACT_BYTES_PER_INTERMEDIATE * intermediate
    if shape.attention == "eager":
        per_layer += 4.0 * g.num_attention_heads * shape.seq_len  # attention scores and probabilities
    # k-bit preparation upcasts the embeddings, so under QLoRA the residual stream between layers is fp32.
    residual = 4.0 if shape.quantization_bit or shape.precision == "fp32" else 2.0
    if shape.gradient_checkpointing:
        per_token = g.num_hidden_layers * residual * g.hidden_size + per_layer  # layer inputs + one layer recomputed
    else:
        per_token = g.num_hidden_layers * per_layer
    if shape.reward:  # one score per token (the head runs over every position) and its gradient, in fp32
        return tokens * per_token, tokens * 8.0
    if shape.fused_loss:
        # Liger's fused linear cross-entropy: chunks of tokens / ceil(vocab / hidden) tokens, each chunk's 16-bit
        # logits and their fp32 gradient, plus the gradient of the hidden states
        chunk = math.ceil(tokens / math.ceil(g.vocab_size / g.hidden_size))
        return tokens * per_token, chunk * 6.0 * g.vocab_size + tokens * 2.0 * g.hidden_size
    return tokens * per_token, tokens * LOGIT_BYTES_PER_VOCAB * g.vocab_size


DEQUANTIZED_EXPERTS_KEPT = ("every layer's 4-bit fused experts (both tensors) kept dequantized until the backward "
                            "pass without gradient checkpointing: autograd saves the weights it multiplied with")


def dequantized_expert_bytes(shape: RunShape) -> float:
    """What 4-bit fused experts hold dequantized for the backward pass (in the load dtype, which the quantization
    state keeps): autograd saves the dequantized gate_up and down tensors each layer's forward multiplied with, so
    without checkpointing every layer's stay until the backward pass reaches it; with checkpointing only the layer
    being recomputed holds them (tests/integration/test_moe_quantization.py counts what autograd saves)."""
    g = shape.geometry
    if shape.quantization_bit != 4 or not g.num_local_experts:
        return 0.0
    layers = 1 if shape.gradient_checkpointing else g.num_hidden_layers
    return layers * expert_params(g) * (4.0 if shape.precision == "fp32" else 2.0)


LOADING = ("the weights loaded so far in their load dtype (before k-bit preparation), and a fused expert tensor being "
           "joined from the checkpoint's per-expert pieces: pieces and joined tensor in 16-bit")


def _loading_bytes(shape: RunShape, linear_params: int, other_params: int, w16: float) -> float:
    """The moment a quantized mixture of experts loads its last fused gate_up tensor onto the GPU (quantized models
    load there, others on the CPU): every other weight as loaded, quantized or in the load dtype, and that tensor's
    per-expert pieces stacked beside the joined tensor. Under 4-bit each is quantized as soon as it is joined
    (engine.models.moe_quant), so only one is ever there in 16-bit; under 8-bit they stay 16-bit. 0 for other
    models, whose loading holds no more than training does."""
    g = shape.geometry
    bits = shape.quantization_bit
    if not bits or not g.num_local_experts or shape.sharding == "zero3":
        return 0.0
    experts = g.num_hidden_layers * expert_params(g)
    gate_up = expert_params(g) * 2 // 3 * w16
    if bits == 4:
        weights = (linear_params + experts) * _quantized_bytes(shape) + (other_params - experts) * w16
        return weights + 2 * gate_up  # the packed result is counted with the weights
    return linear_params * _quantized_bytes(shape) + other_params * w16 + gate_up


INT8_KEPT_INPUTS = ("bitsandbytes' 8-bit matmul keeps every layer's inputs (fp32 after k-bit preparation) until the "
                    "backward pass, out of gradient checkpointing's reach: memory grows with batch x cutoff_len")


def int8_kept_input_bytes(shape: RunShape) -> float:
    """Per token, what 8-bit QLoRA keeps beyond 16-bit LoRA: bitsandbytes' MatMul8bitLt hangs its input on ``ctx``
    instead of saving it for backward, so non-reentrant checkpointing (the engine's) neither frees nor recomputes it,
    in every layer. Layers sharing an input (q, k, v; gate, up) keep it once; the norms' outputs and act(gate) x up
    are fp32 (the embeddings and norms are, and the 8-bit matmul returns its input's dtype), the attention output is
    in the compute dtype. Fused experts stay 16-bit outside bitsandbytes (engine.models.moe_quant)."""
    g = shape.geometry
    compute = 4.0 if shape.precision == "fp32" else 2.0
    per_layer = 4.0 * g.hidden_size + compute * g.num_attention_heads * g.head_dim
    if not g.num_local_experts:
        per_layer += 4.0 * (g.hidden_size + g.intermediate_size)
    return g.num_hidden_layers * per_layer


def _autocast_copies(shape: RunShape, trainable: int, other_params: int) -> float:
    """Autocast keeps 16-bit copies of the fp32 weights a forward pass multiplies with (trained layers, and the
    upcast head under QLoRA) until the backward pass is done."""
    g = shape.geometry
    copies = 0.0
    if shape.precision == "pure_bf16":
        return copies  # the weights are bfloat16 already: nothing to cast
    if shape.finetuning_type in ("full", "freeze"):
        copies += trainable * 2.0
    if shape.quantization_bit and not shape.reward:  # a reward model has no LM head to multiply with
        copies += g.vocab_size * g.hidden_size * 2.0
    return copies
