"""4-bit quantization of fused mixture-of-experts weights, which bitsandbytes' ``nn.Linear`` swap leaves in 16-bit.

transformers 5 keeps each layer's experts as 3-D parameters (Mixtral's ``gate_up_proj`` / ``down_proj``, Qwen-MoE's,
...); bitsandbytes' own ``replace_parameter_4bit`` quantizes them in place and dequantizes them when the forward reads
them. They are quantized as they load (``quantizing_experts_while_loading``): quantized after loading, the whole
model's 16-bit experts would be on the GPU first (Mixtral 8x7B: ~87 GiB). bitsandbytes has no 8-bit counterpart, so
under 8-bit they stay in the load dtype.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from contextlib import contextmanager
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
    """(module, name) of every fused expert weight still in floating point (not meta): stacked experts, one slice
    each."""
    found = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if is_fused_expert(module, name) and param.device.type != "meta":
                found.append((module, name))
    return found


def is_fused_expert(module, name: str) -> bool:
    """Whether ``module``'s own parameter ``name`` is a 3-D floating-point weight outside a convolution (a 4-bit one
    is packed integers behind a parametrization, no longer a parameter of ``module``)."""
    import torch

    param = dict(module.named_parameters(recurse=False)).get(name)
    return (param is not None and param.ndim == 3 and param.is_floating_point()
            and not isinstance(module, torch.nn.modules.conv._ConvNd))


def quantize_fused_experts(model, quant_type: str, double_quantization: bool) -> ExpertQuantization | None:
    """Quantize the fused expert weights left in floating point in place (NF4/FP4, with compressed statistics when
    double_quantization; they dequantize to their load dtype, the training compute dtype) and report every 4-bit
    expert tensor, those quantized as they loaded too. None when the model has none."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    for module, name in fused_expert_parameters(model):
        replace_parameter_4bit(module, name, compress_statistics=double_quantization, quant_type=quant_type)
    quantized = list(quantized_parameters(model).values())
    if not quantized:
        return None
    before = sum(math.prod(quant_state(m, n).shape) * quant_state(m, n).dtype.itemsize for m, n in quantized)
    done = ExpertQuantization(len(quantized), before, sum(held_bytes(m, n) for m, n in quantized))
    log.info(done.describe())
    return done


_SWAP = threading.Lock()
_loads = 0  # loads inside quantizing_experts_while_loading now (the TUI's workers load in threads)
_replaced = None  # the mapping's entry before the first of them


@contextmanager
def quantizing_experts_while_loading():
    """Within: transformers' bitsandbytes 4-bit quantizer also claims every fused expert weight and quantizes it on
    its device, with the load's own settings, as soon as the checkpoint's per-expert pieces are joined; none is ever
    set on the model in 16-bit, so loading holds one expert tensor in 16-bit at a time."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    global _loads, _replaced
    quantizer = _experts_quantizer()
    with _SWAP:
        if not _loads:
            _replaced = AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"]  # what was there, put back by the last load out
        _loads += 1
        AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] = quantizer
    try:
        yield
    finally:
        with _SWAP:
            _loads -= 1
            if not _loads:
                AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] = _replaced


@functools.cache
def _experts_quantizer():
    """transformers' Bnb4BitHfQuantizer, claiming fused expert weights too (``param_needs_quantization``), and its
    quantize operation, which hands the Linear weights on to bitsandbytes' own and quantizes the experts in place."""
    import torch
    from bitsandbytes.nn.parametrize import replace_parameter_4bit
    from transformers.integrations.bitsandbytes import Bnb4bitQuantize
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizers_utils import get_module_from_name

    class QuantizeExperts(Bnb4bitQuantize):
        def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
            settings = self.hf_quantizer.quantization_config
            linears = {}
            for name, value in input_dict.items():
                module, attr = get_module_from_name(model, name)
                if not is_fused_expert(module, attr):
                    linears[name] = value
                    continue
                setattr(module, attr, torch.nn.Parameter(value[0] if isinstance(value, list) else value,
                                                         requires_grad=False))
                replace_parameter_4bit(module, attr, compress_statistics=settings.bnb_4bit_use_double_quant,
                                       quant_type=settings.bnb_4bit_quant_type)
                if missing_keys is not None:
                    missing_keys.discard(name)
                if all(getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False)):
                    module._is_hf_initialized = True  # loaded whole: transformers' initialization leaves it alone
            if not linears:
                return {}
            return super().convert(linears, full_layer_name=full_layer_name, model=model, **kwargs)

    class Bnb4BitExpertsHfQuantizer(Bnb4BitHfQuantizer):
        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return (super().param_needs_quantization(model, param_name, **kwargs)
                    or is_fused_expert(*get_module_from_name(model, param_name)))

        def get_quantize_ops(self):
            return QuantizeExperts(self)

    return Bnb4BitExpertsHfQuantizer


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
