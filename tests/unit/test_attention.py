"""Padding-free rows keep samples apart: on every attention path this machine runs, each sample of a packed row gets
the logits and loss it gets alone (engine.models.attention, TRL's padding-free collator)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from engine.models.attention import VARLEN, register_varlen_attention

LENGTHS = (7, 19, 4, 11)
PATHS = ("eager", "sdpa", VARLEN)
# On a GPU the same checks run for the CUDA paths too: VARLEN there is torch's varlen_attn (bf16), and
# flash-attention-2 when it is installed (tests/conftest.py leaves gpu tests out where there is no GPU, and says so).
GPU_PATHS = [VARLEN] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def _samples(vocab_size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length in LENGTHS:
        ids = torch.randint(4, vocab_size, (length,), generator=generator).tolist()
        labels = [-100] * (length // 3) + ids[length // 3:]  # a prompt part that is not learned
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def _load(path, attention: str):
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def _alone(model, sample: dict):
    ids = torch.tensor([sample["input_ids"]])
    out = model(input_ids=ids, labels=torch.tensor([sample["labels"]]))
    return out.logits[0], out.loss


@pytest.mark.parametrize("attention", PATHS)
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])  # Mistral: grouped-query attention
def test_each_packed_sample_equals_the_sample_alone(tiny_models, name, attention):
    model = _load(tiny_models[name], attention)
    samples = _samples(model.config.vocab_size)
    batch = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True)(samples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**batch)
        start, token_losses, learned = 0, [], 0
        for sample in samples:
            logits, loss = _alone(model, sample)
            end = start + len(sample["input_ids"])
            torch.testing.assert_close(packed.logits[0, start:end], logits, atol=2e-5, rtol=1e-4)
            n = sum(label != -100 for label in sample["labels"][1:])
            token_losses.append(loss * n)
            learned += n
            start = end
    # the packed loss is the mean over every learned token of every sample: no sample predicts its neighbour's start
    torch.testing.assert_close(packed.loss, sum(token_losses) / learned, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", GPU_PATHS)
def test_on_a_gpu_each_packed_sample_equals_the_sample_alone(tiny_models, attention):
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-mistral"], attn_implementation=attention,
                                                 dtype=torch.bfloat16).cuda().eval()
    model.config.use_cache = False
    samples = _samples(model.config.vocab_size)
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True)(samples).items()}
    with torch.no_grad():
        packed, start = model(**batch).logits[0].float(), 0
        for sample in samples:
            alone = model(input_ids=torch.tensor([sample["input_ids"]], device="cuda")).logits[0].float()
            end = start + len(sample["input_ids"])
            torch.testing.assert_close(packed[start:end], alone, atol=3e-2, rtol=3e-2)  # bf16
            start = end


@pytest.mark.parametrize("attention", PATHS)
def test_a_packed_row_trains_the_same_gradients_as_the_samples_apart(tiny_models, attention):
    """The backward pass too: the gradients of one packed row equal the padded batch's (the same samples)."""
    samples = _samples(1000)[:3]
    grads = {}
    for padding_free in (True, False):
        model = _load(tiny_models["tiny-llama"], attention).train()
        batch = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=padding_free)(samples)
        out = model(**batch)
        learned = sum(sum(label != -100 for label in s["labels"][1:]) for s in samples)
        (out.loss * learned).backward()  # both as token sums: padded and packed means weigh tokens alike
        grads[padding_free] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False], atol=1e-5, rtol=1e-4)


def test_with_the_kv_cache_on_transformers_lets_packed_samples_attend_to_each_other(tiny_models):
    """The trap the engine avoids (load_model and the trainer set use_cache=False): with a cache, SDPA builds no
    packed mask, so the second sample of a row sees the first."""
    model = _load(tiny_models["tiny-llama"], "sdpa")
    samples = _samples(model.config.vocab_size)[:2]
    batch = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=True)(samples)
    with torch.no_grad():
        mixed = model(**batch, use_cache=True).logits[0, LENGTHS[0]:LENGTHS[0] + LENGTHS[1]]
        apart = model(**batch, use_cache=False).logits[0, LENGTHS[0]:LENGTHS[0] + LENGTHS[1]]
        alone, _ = _alone(model, samples[1])
    torch.testing.assert_close(apart, alone, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(mixed, alone, atol=1e-3)


def test_the_engine_loads_models_without_the_kv_cache(tiny_models):
    from engine.config.schema import parse_args
    from engine.models.loading import Precision, load_model

    cfg = parse_args(["--model_name_or_path", str(tiny_models["tiny-llama"])])
    model = load_model(str(tiny_models["tiny-llama"]), cfg, Precision("fp32", "test"), VARLEN)
    assert model.config.use_cache is False and model.config._attn_implementation == VARLEN


def test_a_padded_batch_through_the_varlen_name_is_masked_like_sdpa(tiny_models):
    """Evaluation batches that are padded (no cu_seq_lens) go through SDPA with their padding mask."""
    samples = _samples(1000)[:2]
    batch = DataCollatorForLanguageModeling(pad_token_id=3)(samples)
    with torch.no_grad():
        ours = _load(tiny_models["tiny-llama"], VARLEN)(**batch).logits
        sdpa = _load(tiny_models["tiny-llama"], "sdpa")(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], sdpa[keep], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("padding_free", [True, False])
def test_the_learned_token_loss_is_the_model_s_own_loss(tiny_models, padding_free):
    """The CPU trainer projects only the learned positions through the LM head: the same loss and gradients."""
    from engine.train.loss import learned_token_loss

    samples = _samples(1000)
    batch = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=padding_free)(samples)
    results = []
    for ours in (True, False):
        model = _load(tiny_models["tiny-llama"], VARLEN if padding_free else "sdpa").train()
        loss = learned_token_loss(model, batch)[0] if ours else model(**batch).loss
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)
    model = _load(tiny_models["tiny-llama"], VARLEN)
    kept = learned_token_loss(model, batch, num_items_in_batch=torch.tensor(1000))[1].logits.shape[1]
    learned = sum(1 for s in samples for label in s["labels"][1:] if label != -100)
    assert kept < sum(LENGTHS) and (kept == learned or not padding_free)



def test_fp32_inputs_under_autocast_reach_the_fused_kernel_in_half_precision(tiny_models, monkeypatch):
    """A k-bit model under bf16 autocast hands attention fp32 q/k/v (PEFT keeps norms in fp32, bitsandbytes' layers
    return their input's dtype). They go to torch's fused varlen kernel cast to bf16, as transformers' flash path
    does, not through the per-sample loop. This machine has no CUDA: the device check and the kernel are stood in
    for at that boundary (the kernel by per-sample SDPA in the dtype it is given); the routing is the real one."""
    from engine.models import attention

    reached = []
    per_sample = attention._per_sample_sdpa

    def kernel(query, key, value, cu_q, cu_k, max_q, max_k, scaling):
        reached.append((query.dtype, key.dtype, value.dtype))
        return per_sample(query, key, value, cu_q, 0.0, scaling)

    def slow_path(*args):
        raise AssertionError("the call took the per-sample loop")

    monkeypatch.setattr(attention, "_on_cuda", lambda tensor: True)
    monkeypatch.setattr(attention, "torch_varlen_available", lambda: True)
    monkeypatch.setattr(attention, "_torch_varlen", kernel)
    monkeypatch.setattr(attention, "_per_sample_sdpa", slow_path)
    module = _load(tiny_models["tiny-llama"], VARLEN).model.layers[0].self_attn
    heads, kv_heads, dim = 4, 2, 16
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, h, sum(LENGTHS), dim, generator=generator)
                         for h in (heads, kv_heads, kv_heads))
    bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.varlen_attention_forward(module, query, key, value, None, cu_seq_lens_q=bounds,
                                                    cu_seq_lens_k=bounds, max_length_q=max(LENGTHS),
                                                    max_length_k=max(LENGTHS))
    assert reached == [(torch.bfloat16,) * 3]
    reference, _ = per_sample(query, key, value, bounds, 0.0, None)
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)
