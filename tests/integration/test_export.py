"""`tuner export` on tiny runs: merged LoRA and QLoRA adapters, a full fine-tune, the base's dtype, shards, the chat
template, and the refusals that keep a half-written or wrong export from ever standing in export_dir."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.cli import main

CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "And now?"}]
TRAIN = ["--dataset", "demo_alpaca", "--max_samples", "16", "--max_steps", "3", "--per_device_train_batch_size", "4",
         "--save_strategy", "no"]


def train(out: Path, *args: str) -> Path:
    assert main(["train", "--output_dir", str(out), *TRAIN, *args]) == 0
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_models, tmp_path_factory) -> Path:
    """An adapter trained with a template other than the model's own, so the export must carry it."""
    return train(tmp_path_factory.mktemp("lora") / "run", "--model_name_or_path", "tiny-llama", "--template", "chatml",
                 "--learning_rate", "5e-3")


@pytest.fixture(scope="module")
def bf16_base(tiny_models, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("bf16") / "tiny-llama-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llama"], dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_models["tiny-llama"]).save_pretrained(path)
    return path


def export(*args: str) -> int:
    return main(["export", *args])


def safetensors_dtypes(directory: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for shard in directory.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            dtypes |= {str(f.get_tensor(name).dtype) for name in f.keys()}
    return dtypes


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f"{out.name}.")]


def test_lora_export_reloads_as_a_plain_model_that_matches_base_plus_adapter(tiny_models, lora_run, tmp_path, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.templates import get_template, render_text

    out = tmp_path / "merged"
    assert export("--model_name_or_path", "tiny-llama", "--finetuning_type", "lora", "--checkpoint_dir",
                  str(lora_run), "--export_dir", str(out)) == 0

    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists() and not leftovers(out)
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == render_text(
        get_template("chatml"), CONVERSATION, tokenizer, add_generation_prompt=True), "the run's template, not llama2"
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos, "generation stops at the template's stop word"

    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llama"]), lora_run)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llama"])
    ids = tokenizer.apply_chat_template(CONVERSATION, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        merged, expected, untrained = (m(input_ids=ids).logits for m in (exported, reference, base))
    assert (merged - expected).abs().max() < 1e-4
    assert (merged - untrained).abs().max() > 1e-2, "the adapter is in the exported weights"

    printed = capsys.readouterr().out.strip().splitlines()
    summary = rf"exported {re.escape(str(out))}: 1 safetensors file, \d+\.\d MB, float32, chat template chatml"
    assert re.fullmatch(summary, printed[-2]), printed[-2]
    assert printed[-1].startswith("check: logits of a sample conversation match base + adapter within ")


def test_qlora_adapter_is_merged_into_a_16_bit_base_and_says_so(tiny_models, tmp_path, capsys):
    run = train(tmp_path / "qlora", "--model_name_or_path", "tiny-llama", "--quantization_bit", "4",
                "--learning_rate", "5e-3")
    out = tmp_path / "merged"
    assert export("--stage", "sft", "--model_name_or_path", "tiny-llama", "--template", "llama2",
                  "--finetuning_type", "lora", "--checkpoint_dir", str(run), "--quantization_bit", "4",
                  "--export_dir", str(out)) == 0
    assert ("quantization_bit 4 ignored for the merge: the base is loaded in 16-bit and the adapter merged into it"
            in capsys.readouterr().err)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert safetensors_dtypes(out) == {"torch.float32"}, "the demo base is fp32: exported as it is"


def test_full_fine_tune_exports_in_the_dtype_of_its_original_base(bf16_base, tmp_path, capsys):
    """A local base without a catalog entry trains with its own chat template (auto), which the export keeps."""
    run = train(tmp_path / "full", "--model_name_or_path", str(bf16_base), "--finetuning_type", "full",
                "--learning_rate", "2e-3")
    assert json.loads((run / "config.json").read_text())["dtype"] == "float32", "full training saves fp32"
    out = tmp_path / "merged"
    assert export("--model_name_or_path", str(run), "--finetuning_type", "full", "--export_dir", str(out)) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert safetensors_dtypes(out) == {"torch.bfloat16"}
    printed = capsys.readouterr().out
    assert "bfloat16, chat template auto" in printed and "match the fine-tuned model within" in printed


def test_lora_on_a_bf16_base_exports_bf16(bf16_base, lora_run, tmp_path):
    out = tmp_path / "merged"
    assert export("--model_name_or_path", str(bf16_base), "--checkpoint_dir", str(lora_run),
                  "--export_dir", str(out)) == 0
    assert safetensors_dtypes(out) == {"torch.bfloat16"}


def test_small_shard_size_writes_shards_and_an_index(lora_run, tmp_path, monkeypatch, capsys):
    import engine.infer.export

    monkeypatch.setattr(engine.infer.export, "max_shard_size", lambda export_size: "1MB")
    out = tmp_path / "sharded"
    assert export("--model_name_or_path", "tiny-llama", "--checkpoint_dir", str(lora_run),
                  "--export_dir", str(out)) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (out / "model.safetensors").exists()
    assert f"{len(shards)} safetensors shards" in capsys.readouterr().out


def test_non_empty_export_dir_is_refused_unless_overwrite_is_set(lora_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--model_name_or_path", "tiny-llama", "--checkpoint_dir", str(lora_run), "--export_dir", str(out)]
    assert export(*args) == 2
    assert capsys.readouterr().err.strip() == (
        f"tuner: error: export_dir {out} is not empty; set overwrite_output_dir true to replace it")
    assert (out / "notes.txt").read_text() == "mine"

    assert export(*args, "--overwrite_output_dir") == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file() and not leftovers(out)


def test_export_dir_holding_the_adapter_is_refused_even_with_overwrite(lora_run, capsys):
    assert export("--model_name_or_path", "tiny-llama", "--checkpoint_dir", str(lora_run),
                  "--export_dir", str(lora_run.parent), "--overwrite_output_dir") == 2
    assert "which is being exported" in capsys.readouterr().err
    assert (lora_run / "adapter_model.safetensors").is_file()


def test_export_that_fails_its_check_leaves_export_dir_as_it_was(lora_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("peft.tuners.lora.LoraModel.merge_and_unload", lambda self, *a, **k: self.unload())
    out = tmp_path / "bad"
    args = ["--model_name_or_path", "tiny-llama", "--checkpoint_dir", str(lora_run), "--export_dir", str(out)]
    assert export(*args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tuner: error: the exported model's logits differ from the fine-tuned model's by up to ")
    assert "(limit 0.00" in error and "for float32" in error
    assert not out.exists() and not leftovers(out)

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export(*args, "--overwrite_output_dir") == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not leftovers(out)
