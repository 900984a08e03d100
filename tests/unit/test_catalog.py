"""The model catalog: lookups, parameter counts, geometry from config.json, and where a model name resolves to.

Nothing here reaches the network: HF_HUB_OFFLINE=1 and an empty, temporary Hugging Face cache.
"""

from __future__ import annotations

import json
import socket

import pytest

from engine.errors import UserError
from engine.models.catalog import list_models, lookup, model_geometry_from_config, param_count
from engine.models.resolve import resolve_model
from engine.templates import template_names

# Parameter counts as their publishers state them (model cards, papers).
PUBLISHED_BILLIONS = {
    "llama2-7b": 6.74,
    "llama2-13b": 13.0,
    "llama2-70b": 69.0,
    "mistral-7b-v0.1": 7.24,
    "mixtral-8x7b": 46.7,
    "llama3.1-8b": 8.03,
    "llama3.1-70b": 70.6,
    "llama3.2-1b": 1.24,
    "llama3.2-3b": 3.21,
    "qwen2.5-7b": 7.62,
    "qwen2.5-14b": 14.7,
    "gemma2-9b": 9.24,
}

MISTRAL_7B_V01_CONFIG_JSON = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache in tmp and offline mode, so nothing can reach the hub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def _fake_cached_model(hub_cache, hub_id: str, files: dict[str, str]) -> str:
    """Lay out a model in the hub cache the way huggingface_hub does: refs/main names a snapshot folder."""
    repo = hub_cache / f"models--{hub_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return str(snapshot)


def test_lookup_finds_short_name_and_hub_id_in_any_case():
    spec = lookup("llama2-7b-chat")
    assert spec.hub_id == "meta-llama/Llama-2-7b-chat-hf"
    assert lookup("META-LLAMA/llama-2-7b-chat-HF") is spec
    assert lookup("  Mixtral-8x7B-Instruct ") is lookup("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert lookup("no-such-model") is None


def test_catalog_names_are_unique_and_templates_exist():
    models = list_models()
    names = [m.name for m in models]
    assert len(names) == len(set(names))
    hub_ids = [m.hub_id for m in models if m.hub_id]
    assert len(hub_ids) == len(set(hub_ids))
    assert {m.template for m in models} <= set(template_names())


def test_base_models_default_to_the_default_template_and_chat_models_to_their_own():
    for spec in list_models():
        if spec.demo:
            continue
        chat = any(tag in spec.hub_id.lower() for tag in ("-chat", "-instruct", "-it"))
        assert (spec.template != "default") == chat, spec.name
    assert lookup("mixtral-8x7b-instruct").template == "mistral"
    assert lookup("qwen2.5-7b-instruct").template == "qwen"
    assert lookup("llama3.2-1b-instruct").template == "llama3"


@pytest.mark.parametrize("name, billions", sorted(PUBLISHED_BILLIONS.items()))
def test_param_count_is_within_one_percent_of_the_published_count(name, billions):
    assert param_count(lookup(name)) == pytest.approx(billions * 1e9, rel=0.01)


def test_param_count_is_exact_for_llama2_7b():
    assert param_count(lookup("llama2-7b")) == 6_738_415_616
    assert param_count(lookup("llama2-7b").geometry) == 6_738_415_616


def test_geometry_from_a_real_config_json_matches_the_catalog_entry():
    assert model_geometry_from_config(MISTRAL_7B_V01_CONFIG_JSON) == lookup("mistral-7b-v0.1").geometry


def test_geometry_fills_in_what_the_model_type_implies():
    old_llama = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "vocab_size": 32000}
    geometry = model_geometry_from_config(old_llama)
    assert (geometry.num_key_value_heads, geometry.head_dim, geometry.tie_word_embeddings) == (32, 128, False)
    assert param_count(geometry) == 6_738_415_616

    gemma = {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000}
    geometry = model_geometry_from_config(gemma)
    assert (geometry.tie_word_embeddings, geometry.norms_per_layer, geometry.head_dim) == (True, 4, 256)

    qwen = model_geometry_from_config({**old_llama, "model_type": "qwen2"})
    assert qwen.qkv_bias and not qwen.o_bias
    assert param_count(qwen) == param_count(model_geometry_from_config(old_llama)) + 32 * 3 * 4096


def test_geometry_reads_the_text_config_of_a_multimodal_config():
    config = {"model_type": "llava", "text_config": MISTRAL_7B_V01_CONFIG_JSON, "vision_config": {}}
    assert model_geometry_from_config(config) == lookup("mistral-7b-v0.1").geometry


def test_geometry_names_every_missing_key():
    with pytest.raises(UserError) as error:
        model_geometry_from_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "vocab_size": 50257})
    assert "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads" in error.value.message


def test_moe_geometry_counts_every_expert_and_the_router():
    dense = model_geometry_from_config({**MISTRAL_7B_V01_CONFIG_JSON})
    moe = model_geometry_from_config({**MISTRAL_7B_V01_CONFIG_JSON, "model_type": "mixtral",
                                      "num_local_experts": 8, "num_experts_per_tok": 2})
    per_layer_mlp = 3 * 4096 * 14336
    assert param_count(moe) - param_count(dense) == 32 * (7 * per_layer_mlp + 8 * 4096)
    assert moe == lookup("mixtral-8x7b").geometry


def test_resolve_local_directory_gives_its_absolute_path(tmp_path, offline_hub, monkeypatch):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(MISTRAL_7B_V01_CONFIG_JSON))
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("./my-model")
    assert (resolved.path, resolved.source, resolved.spec) == (str(model_dir.resolve()), "local", None)


def test_resolve_directory_without_config_json_says_what_is_missing(tmp_path, offline_hub):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as error:
        resolve_model(str(tmp_path / "empty"))
    assert error.value.message == f"{tmp_path / 'empty'} has no config.json"

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError) as error:
        resolve_model(str(adapter))
    assert "adapter_name_or_path" in error.value.hint


def test_resolve_a_file_is_refused(tmp_path, offline_hub):
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(UserError, match="is a file, not a model directory"):
        resolve_model(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("name", ["./x", "/abs/no/such/model", "x y", "../models/llama", "tiny-lama"])
def test_resolve_missing_path_says_no_such_directory(name, offline_hub):
    with pytest.raises(UserError) as error:
        resolve_model(name)
    assert error.value.message == f"no such directory: {name}"


def test_resolve_typo_suggests_the_closest_known_name(offline_hub):
    with pytest.raises(UserError) as error:
        resolve_model("tiny-lama")
    assert error.value.hint.startswith("did you mean tiny-llama?")


def test_resolve_uncached_hub_id_offline_says_the_hub_cannot_be_reached(offline_hub):
    with pytest.raises(UserError) as error:
        resolve_model("someone/some-model")
    assert error.value.message == (
        "someone/some-model is not in the local Hugging Face cache and the hub cannot be reached"
    )
    assert "hf download someone/some-model" in error.value.hint
    assert "local directory" in error.value.hint


def test_resolve_catalog_name_offline_names_its_hub_id(offline_hub):
    with pytest.raises(UserError, match="^meta-llama/Llama-2-7b-hf is not in the local Hugging Face cache"):
        resolve_model("llama2-7b")


def test_resolve_unreachable_hub_without_offline_flag(offline_hub, monkeypatch):
    with socket.socket() as s:  # a local port nobody listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match="the hub cannot be reached"):
        resolve_model("someone/some-model")


def test_resolve_hub_id_in_the_local_cache_gives_the_snapshot(offline_hub):
    snapshot = _fake_cached_model(offline_hub, "mistralai/Mistral-7B-v0.1", {
        "config.json": json.dumps(MISTRAL_7B_V01_CONFIG_JSON), "model.safetensors": "",
    })
    for name in ("mistral-7b-v0.1", "mistralai/Mistral-7B-v0.1"):
        resolved = resolve_model(name)
        assert (resolved.path, resolved.source, resolved.spec) == (snapshot, "hub-cache", lookup("mistral-7b-v0.1"))

    snapshot = _fake_cached_model(offline_hub, "someone/not-in-catalog", {
        "config.json": "{}", "model-00001-of-00002.safetensors": "",
    })
    assert resolve_model("someone/not-in-catalog").spec is None


def test_resolve_cache_with_config_but_no_weights_is_not_cached(offline_hub):
    _fake_cached_model(offline_hub, "someone/half-downloaded", {"config.json": "{}"})
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_model("someone/half-downloaded")
