"""Attention for padding-free batches: samples joined into one row attend only within themselves, with no dense mask.

TRL's padding-free collator joins a micro-batch into one row and passes the sample boundaries as ``cu_seq_lens_q/k``
(and ``position_ids`` that restart at 0 for each sample). flash-attention reads those boundaries itself. Without it,
transformers' SDPA and eager paths turn the ``position_ids`` into a dense block-diagonal mask over the whole row:
correct, but quadratic in the row and without SDPA's fused kernel. ``VARLEN`` is our own attention name, registered
with transformers' ``AttentionInterface``, that honours the boundaries directly:

- on CUDA with torch's variable-length attention (``torch.nn.attention.varlen``, torch >= 2.10): one fused call, in
  half precision (fp32 q/k/v from a k-bit model or under autocast are cast first, as transformers' flash path does);
- elsewhere: SDPA per sample (causal, no mask), which is exact and costs only the samples' own lengths.

A batch without ``cu_seq_lens`` (evaluation with padding, generation) goes through transformers' SDPA unchanged.
The KV cache must be off while training packed rows: with a cache transformers builds no packed mask at all and
samples would attend to each other (``load_model`` sets ``use_cache=False``).
"""

from __future__ import annotations

import functools

VARLEN = "tuner_varlen"


@functools.cache  # asked by every attention call on a GPU: the answer does not change within a process
def torch_varlen_available() -> bool:
    """torch's fused variable-length attention: CUDA only, torch >= 2.10."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False  # FlashAttention-2 underneath: Ampere or newer
    try:
        import torch.nn.attention.varlen as varlen
    except ImportError:
        return False
    return hasattr(varlen, "varlen_attn")


def register_varlen_attention() -> str:
    """Make ``attn_implementation=VARLEN`` known to transformers (registering again changes nothing); returns the
    name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    # Like flash-attention: no 4-D mask is built; a padded batch passes its 2-D padding mask (or None).
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    return VARLEN


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                             **kwargs):
    """transformers' attention-function signature: ``query`` (batch, heads, tokens, dim), ``key``/``value``
    (batch, kv_heads, tokens, dim); returns (batch, tokens, heads, dim) and no attention weights."""
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return _padded_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    dropout = dropout if module.training else 0.0
    longest = int(max_length_q) if max_length_q is not None else int(cu_seq_lens_q.diff().max())
    _refuse_what_varlen_cannot_do(kwargs, longest)
    kernel_dtype = _torch_varlen_dtype(module, query, dropout)
    if kernel_dtype is not None:
        query, key, value = (t.to(kernel_dtype) for t in (query, key, value))
        return _torch_varlen(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling)
    return _per_sample_sdpa(query, key, value, cu_seq_lens_q, dropout, scaling)


def _torch_varlen_dtype(module, query, dropout: float):
    """The half dtype torch's varlen kernel runs this call in, or None when the call takes the per-sample path.

    q/k/v arrive in fp32 from a k-bit model (PEFT's k-bit preparation keeps norms and embeddings in fp32, and
    bitsandbytes' layers return their input's dtype) or under autocast: like transformers' flash-attention path
    (``get_target_dtype``), they are cast to the autocast dtype, else to the quantized model's compute dtype, rather
    than sent through the per-sample loop."""
    head_dim = query.shape[-1]
    if not _on_cuda(query) or dropout != 0.0 or head_dim % 8 or head_dim > 256 or not torch_varlen_available():
        return None
    dtype = query.dtype
    if dtype not in _half_dtypes():
        dtype = _target_dtype(module, query)
    return dtype if dtype in _half_dtypes() else None


def _target_dtype(module, query):
    import torch

    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    config = getattr(module, "config", None)
    if getattr(config, "_is_quantized", False) or getattr(config, "quantization_config", None) is not None:
        return getattr(config, "dtype", None)
    return None


def _on_cuda(tensor) -> bool:
    return tensor.is_cuda


def _refuse_what_varlen_cannot_do(kwargs: dict, longest: int) -> None:
    """engine.train.speed does not give VARLEN to such models (varlen_blocker); one that needs them anyway fails
    loudly rather than train with the wrong attention. A window no sample reaches changes nothing."""
    window = kwargs.get("sliding_window")
    if window is not None and window < longest:
        raise RuntimeError(f"{VARLEN} attention does not implement a sliding window; use flash_attn sdpa")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"{VARLEN} attention does not implement {name}; use flash_attn sdpa")


def varlen_blocker(config: dict, cutoff_len: int) -> str | None:
    """Why a model (its config.json) cannot use VARLEN, or None: a sliding window that a sample can exceed, logit
    soft-capping in attention, attention sinks."""
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and window < cutoff_len:
        return f"its sliding window ({window} tokens) is shorter than cutoff_len"
    if config.get("attn_logit_softcapping"):
        return "its attention soft-caps logits"
    if config.get("model_type") in SINK_MODELS:
        return "its attention has sinks"
    return None


SINK_MODELS = ("gpt_oss",)


def _half_dtypes():
    import torch

    return (torch.float16, torch.bfloat16)


def _per_sample_sdpa(query, key, value, cu_seq_lens, dropout: float, scaling):
    import torch
    import torch.nn.functional as F

    gqa = query.shape[1] != key.shape[1]
    bounds = cu_seq_lens.tolist()
    parts = [
        F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                       dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for start, end in zip(bounds[:-1], bounds[1:]) if end > start
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _torch_varlen(query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_q, max_k, scaling):
    from torch.nn.attention.varlen import varlen_attn

    cu_q = cu_seq_lens_q.to(query.device, non_blocking=True)
    cu_k = cu_q if cu_seq_lens_k is None else cu_seq_lens_k.to(query.device, non_blocking=True)
    max_q = int(max_q) if max_q is not None else int(cu_seq_lens_q.diff().max())
    max_k = int(max_k) if max_k is not None else max_q
    # (1, heads, tokens, dim) -> (tokens, heads, dim), the layout varlen_attn takes
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(-1, 0),
                      enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0), None  # (1, tokens, heads, dim)


def _padded_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """A batch that is not a packed row: transformers' SDPA, with the 2-D padding mask made causal and 4-D."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 2:
        import torch

        q_len, kv_len = query.shape[2], key.shape[2]
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attention_mask = causal[None, None] & attention_mask[:, None, None, -kv_len:].bool()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)
