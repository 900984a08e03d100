"""4-bit quantization of fused mixture-of-experts weights, which bitsandbytes' ``nn.Linear`` swap leaves in 16-bit.

transformers 5 keeps each layer's experts as 3-D parameters (Mixtral's ``gate_up_proj`` / ``down_proj``, Qwen-MoE's,
...); bitsandbytes' own ``replace_parameter_4bit`` quantizes them in place and dequantizes them when the forward reads
them. bitsandbytes has no 8-bit counterpart, so under 8-bit they stay in the load dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("tuner")


@dataclass(frozen=True)
class ExpertQuantization:
    tensors: int
    bytes_before: int
    bytes_after: int  # packed 4-bit data and quantization state (absmax, code, nested statistics)

    def describe(self) -> str:
        return (f"quantized {self.tensors} fused expert tensors to 4-bit: {self.bytes_before / 1e6:.1f} MB -> "
                f"{self.bytes_after / 1e6:.1f} MB")


def fused_expert_parameters(model) -> list[tuple[object, str]]:
    """(module, name) of every 3-D floating-point weight outside a convolution: stacked experts, one slice each."""
    import torch

    found = []
    for module in model.modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.ndim == 3 and param.is_floating_point() and param.device.type != "meta":
                found.append((module, name))
    return found


def quantize_fused_experts(model, quant_type: str, double_quantization: bool) -> ExpertQuantization | None:
    """Quantize the fused expert weights in place (NF4/FP4, with compressed statistics when double_quantization);
    they dequantize to their load dtype, the training compute dtype. None when the model has none."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    targets = fused_expert_parameters(model)
    if not targets:
        return None
    before = after = 0
    for module, name in targets:
        before += _nbytes(getattr(module, name))
        replace_parameter_4bit(module, name, compress_statistics=double_quantization, quant_type=quant_type)
        after += held_bytes(module, name)
    done = ExpertQuantization(len(targets), before, after)
    log.info(done.describe())
    return done


def note_unquantized_experts(model) -> None:
    """Under 8-bit: say once that the fused experts keep their load dtype (bitsandbytes has no 8-bit parameter path)."""
    targets = fused_expert_parameters(model)
    if targets:
        size = sum(_nbytes(getattr(module, name)) for module, name in targets)
        dtype = getattr(*targets[0]).dtype
        log.info("%d fused expert tensors stay %s under 8-bit (%.1f MB): bitsandbytes quantizes only nn.Linear to "
                 "8-bit; quantization_bit 4 quantizes them too", len(targets), str(dtype).removeprefix("torch."),
                 size / 1e6)


def quantized_parameters(model) -> dict[int, tuple[object, str]]:
    """id of each 4-bit expert tensor's packed storage -> (module, name) of the parameter it stands for."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    found = {}
    for module in model.modules():
        for name, chain in getattr(module, "parametrizations", {}).items():
            if any(isinstance(p, Bnb4bitParametrization) for p in chain):
                found[id(chain.original)] = (module, name)
    return found


def quant_state(module, name: str):
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    return next(p.quant_state for p in module.parametrizations[name] if isinstance(p, Bnb4bitParametrization))


def held_bytes(module, name: str) -> int:
    """Bytes a 4-bit expert tensor holds: packed data plus its quantization state."""
    state = quant_state(module, name)
    tensors = [module.parametrizations[name].original, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(_nbytes(t) for t in tensors)


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()
