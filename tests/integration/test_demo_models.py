"""The built-in demo models: built into a temporary cache, reloaded the way a user's model is, reused once built."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.models.catalog import list_models, lookup, model_geometry_from_config, param_count
from engine.models.resolve import resolve_model
from engine.models.demo import DEMO_MODELS, MARKER, SPECIAL_TOKENS, TEXT_MARKERS, demo_model_path
from engine.errors import UserError

ARCHITECTURES = {"tiny-llama": "LlamaForCausalLM", "tiny-mistral": "MistralForCausalLM",
                 "tiny-mixtral": "MixtralForCausalLM"}
TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語, 中文, 한국어, 😀🚀",
    "math: ∑ x² ≤ ∞; code: `print(f'{x!r}')`",
    "[INST] markers [/INST] and <<SYS>> text <</SYS>>",
]


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    """XDG_CACHE_HOME in a temporary folder for the whole module, so every test sees the same built models."""
    home = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def built(cache_home):
    """Each demo model's directory, built once, with the time each build took."""
    paths, seconds = {}, {}
    for name in DEMO_MODELS:
        start = time.perf_counter()
        paths[name] = demo_model_path(name)
        seconds[name] = time.perf_counter() - start
    return paths, seconds


def test_demo_models_are_the_catalog_demo_entries():
    assert set(DEMO_MODELS) == {spec.name for spec in list_models() if spec.demo}


def test_demo_models_are_built_in_the_user_cache(built, cache_home):
    paths, _ = built
    for name, path in paths.items():
        assert path == cache_home / "tuner-tui" / "demo-models" / name
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        assert (path / "tokenizer.json").is_file() and (path / MARKER).is_file()
    assert not [p for p in (cache_home / "tuner-tui" / "demo-models").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_demo_model_reloads_and_runs_a_forward_pass(built, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built[0][name]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == ARCHITECTURES[name]
    assert model.config.vocab_size == len(tokenizer) == lookup(name).geometry.vocab_size
    config_json = json.loads((path / "config.json").read_text())
    assert model.num_parameters() == param_count(model_geometry_from_config(config_json)) == param_count(lookup(name))
    assert model.num_parameters() < 2_000_000

    batch = tokenizer(["The quick brown fox", "Hi"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, -1] == tokenizer.pad_token_id  # right padding
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_tokenizer_round_trips_any_text(built, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[0][name])
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_chat_markers_are_single_tokens(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[0]["tiny-llama"])
    for marker in SPECIAL_TOKENS + TEXT_MARKERS:
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1, marker


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_demo_model_chat_template_is_its_catalog_template(built, name):
    from transformers import AutoTokenizer

    from engine.templates import get_template, template_mismatch

    tokenizer = AutoTokenizer.from_pretrained(built[0][name])
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=False
    )
    assert text.startswith("<s>[INST] Hi [/INST] Hello!") and text.endswith("</s>")
    assert template_mismatch(get_template(lookup(name).template), tokenizer) is None


def test_second_call_reuses_the_built_model(built):
    paths, build_seconds = built
    marker = paths["tiny-llama"] / MARKER
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert demo_model_path("tiny-llama") == paths["tiny-llama"]
    assert time.perf_counter() - start < 0.2
    assert marker.stat().st_mtime_ns == before
    assert max(build_seconds.values()) < 10


def test_a_changed_recipe_rebuilds(tmp_path):
    path = demo_model_path("tiny-mistral", cache=tmp_path)
    (path / MARKER).write_text(json.dumps({"name": "tiny-mistral", "recipe_version": 0, "sha256": "old"}))
    (path / "leftover.txt").write_text("from the old build")
    assert demo_model_path("tiny-mistral", cache=tmp_path) == path
    assert json.loads((path / MARKER).read_text())["recipe_version"] != 0
    assert not (path / "leftover.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-mistral"]


def test_concurrent_builds_leave_one_complete_model(tmp_path):
    from transformers import AutoModelForCausalLM

    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: demo_model_path("tiny-llama", cache=tmp_path), range(4)))
    assert set(paths) == {tmp_path / "tiny-llama"}
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]
    AutoModelForCausalLM.from_pretrained(paths[0])


def test_resolve_model_builds_a_demo_model(built, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model("Tiny-Mixtral")
    assert (resolved.path, resolved.source) == (str(built[0]["tiny-mixtral"]), "demo")
    assert resolved.spec is lookup("tiny-mixtral")


def test_unknown_demo_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown demo model: tiny-gpt"):
        demo_model_path("tiny-gpt", cache=tmp_path)


@pytest.mark.parametrize("name", ["llama3.2-1b", "mistral-7b-v0.3", "mixtral-8x7b", "qwen2.5-7b", "gemma2-9b"])
def test_param_count_matches_transformers_for_each_family(name):
    """Instantiated on the meta device (no memory), the real architecture has exactly the counted parameters."""
    import dataclasses

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    geometry = dataclasses.asdict(lookup(name).geometry)
    for derived in ("qkv_bias", "o_bias", "norms_per_layer"):
        geometry.pop(derived)
    if not geometry["num_local_experts"]:
        del geometry["num_local_experts"], geometry["num_experts_per_tok"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**geometry))
    assert sum(p.numel() for p in model.parameters()) == param_count(lookup(name))
