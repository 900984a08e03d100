"""Liger's fused kernels (RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy), through liger-kernel's own
``apply_liger_kernel_to_<arch>`` on the loaded model.

TRL's ``use_liger_kernel`` is deprecated and its replacement fetches kernels from the hub at run time (not possible
offline), so the engine calls liger-kernel itself. Liger's kernels are Triton: CUDA only.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from dataclasses import dataclass

from engine.errors import UserError

log = logging.getLogger("tuner")

# What is unsafe per architecture: Mixtral's expert SwiGLU kernel computes weight gradients for frozen experts.
UNSAFE = {"mixtral": {"swiglu": False}, "qwen2_moe": {"swiglu": False}, "qwen3_moe": {"swiglu": False}}


@dataclass(frozen=True)
class LigerChoice:
    on: bool
    why: str


def liger_model_types() -> frozenset[str] | None:
    """The architectures the installed liger-kernel patches; None when it is not installed (or cannot load)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        return frozenset(_apply_functions())
    except Exception as exc:  # an installed but broken liger (its Triton missing): as good as not installed
        log.warning("liger-kernel is installed but does not load: %s", exc)
        return None


def choose_liger(asked: bool | None, on_gpu: bool, model_types: frozenset[str] | None,
                 model_type: str | None) -> LigerChoice:
    """On by default on a GPU when liger-kernel is installed and knows the architecture; asked for where it cannot
    run, a one-line error. ``model_types``: liger_model_types()."""
    if asked is False:
        return LigerChoice(False, "enable_liger_kernel false")
    missing = ("no GPU (Liger's kernels are Triton, CUDA only)" if not on_gpu else
               "liger-kernel is not installed (pip install liger-kernel)" if model_types is None else
               f"liger-kernel has no kernels for model type {model_type}" if model_type not in model_types else None)
    if missing is None:
        return LigerChoice(True, "installed, a GPU is present and the architecture is supported")
    if asked:
        raise UserError(f"enable_liger_kernel is true but {missing}",
                        "set enable_liger_kernel false, or leave it unset to use Liger wherever it can run")
    return LigerChoice(False, missing)


def _apply_functions() -> dict:
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_liger(model) -> list[str]:
    """Patch the loaded model (before PEFT wraps it) with every Liger kernel safe for its architecture; returns the
    kernels applied."""
    model_type = model.config.model_type
    apply = _apply_functions()[model_type]
    accepted = inspect.signature(apply).parameters
    kernels = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
               "cross_entropy": False, **UNSAFE.get(model_type, {})}
    kernels = {name: on for name, on in kernels.items() if name in accepted}
    apply(model=model, **kernels)
    applied = [name for name, on in kernels.items() if on]
    log.info("liger kernels applied to %s: %s", model_type, ", ".join(applied))
    return applied
