"""Continued pre-training (stage pt) on the tiny demo model: raw text from a .txt file and from LLaMA-Factory's
one-column form, joined into blocks of cutoff_len as LLaMA-Factory joins them, every token learned; the losses of a
run equal the Trainer's run by hand on the same blocks; what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import job_helpers
import pytest

from engine.rundir import read_events, read_status

SENTENCES = [f"The {animal} walks to the {place} at {hour} o'clock and sees {count} birds."
             for animal in ("cat", "dog", "fox", "owl") for place in ("river", "market", "forest")
             for hour, count in ((7, 3), (9, 5))]


def write_texts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stories.txt").write_text("\n".join(SENTENCES) + "\n\n")
    (folder / "stories.jsonl").write_text("".join(json.dumps({"body": s}) + "\n" for s in SENTENCES))
    (folder / "dataset_info.json").write_text(json.dumps({"stories": {"file_name": "stories.jsonl",
                                                                      "columns": {"prompt": "body"}}}))
    return folder


def typed(*args: str) -> tuple[int, str]:
    done = job_helpers.tuner(*args, cwd=Path.cwd())
    return done.returncode, done.stdout + done.stderr


def pt_args(dataset: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "pt", "--model_name_or_path", "tiny-llama", "--dataset", dataset, "--dataset_dir",
            str(data), "--output_dir", str(out), "--cutoff_len", "32", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", *extra]


def test_text_is_joined_into_blocks_with_eos_and_every_token_learned(tiny_models, tmp_path):
    from engine.config.schema import build_config
    from engine.data.texts import build_text_datasets
    from engine.models.loading import load_tokenizer
    from engine.templates import tokenize_texts

    data = write_texts(tmp_path / "data")
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": str(data / "stories.txt"), "stage": "pt",
                        "cutoff_len": 32})
    tokenizer = load_tokenizer(str(tiny_models["tiny-llama"]), cfg)
    prepared = build_text_datasets(cfg, tokenizer)
    joined = [t for ids in tokenize_texts(tokenizer, [s + tokenizer.eos_token for s in SENTENCES]) for t in ids]
    rows = prepared.train.to_list()
    assert len(rows) == len(joined) // 32 and all(row["input_ids"] == row["labels"] for row in rows)
    assert [t for row in rows for t in row["input_ids"]] == joined[:len(rows) * 32]
    assert joined.count(tokenizer.eos_token_id) == len(SENTENCES)
    registered = build_config({"model_name_or_path": "tiny-llama", "dataset": "stories", "dataset_dir": str(data),
                               "stage": "pt", "cutoff_len": 32})
    assert build_text_datasets(registered, tokenizer).train.to_list() == rows  # the one-column form: the same blocks


def test_a_pt_run_equals_the_trainer_run_by_hand_on_the_same_blocks(tiny_models, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from engine.config.schema import build_config
    from engine.data.texts import text_blocks
    from engine.models.loading import load_tokenizer

    data, out = write_texts(tmp_path / "data"), tmp_path / "pt"
    code, output = typed(*pt_args("stories", data, out, "--finetuning_type", "full", "--max_steps", "3",
                                  "--learning_rate", "1e-3", "--seed", "11", "--gradient_checkpointing", "false"))
    assert code == 0, output
    status = read_status(out)
    assert status.state == "completed" and status.method == "pt-full"
    ours = [e["loss"] for e in read_events(out) if e["type"] == "log"]

    path = str(tiny_models["tiny-llama"])
    tokenizer = load_tokenizer(path, build_config({"model_name_or_path": path}))
    blocks, _ = text_blocks(SENTENCES, tokenizer, 32)
    set_seed(11)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, logging_steps=1, seed=11, use_cpu=True, report_to=[],
                             save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list([{"input_ids": b} for b in blocks]),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    theirs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert ours == pytest.approx(theirs, rel=1e-4) and ours[0] != ours[-1]


@pytest.mark.parametrize(("extra", "said"), [
    (["--template", "llama2"], "stage pt trains on raw text, which no template wraps"),
    (["--train_on_prompt", "true"], "stage pt learns every token of the text already"),
    (["--default_system", "Be brief."], "stage pt wraps no text in a template"),
])
def test_what_stage_pt_cannot_act_on_is_refused_in_one_line(tmp_path, extra, said):
    data = write_texts(tmp_path / "data")
    code, output = typed(*pt_args("stories", data, tmp_path / "out", *extra))
    assert code == 2 and said in output and "Traceback" not in output


def test_conversations_are_refused_by_stage_pt_and_text_by_stage_sft(tiny_models, tmp_path):
    data = write_texts(tmp_path / "data")
    code, output = typed(*pt_args("demo_alpaca", data, tmp_path / "a", "--max_steps", "1"))
    assert code == 2 and "is not raw text: stage pt trains on text alone" in output
    code, output = typed("train", "--model_name_or_path", "tiny-llama", "--dataset", "stories", "--dataset_dir",
                         str(data), "--output_dir", str(tmp_path / "b"), "--max_steps", "1")
    assert code == 2 and "set stage pt to train on it" in output


def test_preview_shows_the_first_blocks_as_the_model_reads_them(tiny_models, tmp_path):
    from engine.config.schema import build_config
    from engine.data.preview import build_preview

    data = write_texts(tmp_path / "data")
    preview = build_preview(build_config({"model_name_or_path": "tiny-llama", "dataset": "stories",
                                          "dataset_dir": str(data), "stage": "pt", "cutoff_len": 32}), count=2)
    assert len(preview.samples) == 2 and all(len(s.input_ids) == 32 and s.labels == s.input_ids
                                             for s in preview.samples)
    assert preview.samples[0].text.startswith("The cat walks to the river")
    assert preview.stats["count"] == len(SENTENCES) and "joined into" in " ".join(preview.report)


def test_a_pt_runs_config_keeps_no_template_and_predict_and_export_work_on_it(tiny_models, tmp_path):
    import yaml

    data, out = write_texts(tmp_path / "data"), tmp_path / "pt"
    code, output = typed(*pt_args("stories", data, out, "--max_steps", "2"))
    assert code == 0, output
    assert yaml.safe_load((out / "config.yaml").read_text())["template"] is None
    code, output = typed("predict", "--run", str(out), "--dataset", "demo_alpaca", "--max_samples", "2",
                         "--max_new_tokens", "2")
    assert code == 0, output
    code, output = typed("export", "--run", str(out), "--export_dir", str(tmp_path / "merged"))
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file(), output


def test_a_pt_run_stops_with_a_checkpoint_and_resumes_from_it(tiny_models, tmp_path):
    data, out = write_texts(tmp_path / "data"), tmp_path / "pt"
    code, output = typed(*pt_args("stories", data, out, "--max_steps", "400", "--save_steps", "2",
                                  "--per_device_train_batch_size", "1", "--detach"))
    assert code == 0, output
    job_helpers.stops_and_resumes(out)


def test_raw_text_is_cut_once_and_loaded_from_the_cache_after(tiny_models, tmp_path):
    import uuid

    from engine.config.schema import parse_args
    from engine.data.texts import build_text_datasets
    from engine.models.loading import load_tokenizer

    data = tmp_path / "texts.txt"  # texts no earlier test run has seen: the cache outlives the run
    data.write_text("".join(f"{sentence} {uuid.uuid4().hex}\n" for sentence in SENTENCES))
    cfg = parse_args(["--stage", "pt", "--model_name_or_path", "tiny-llama", "--dataset", str(data), "--cutoff_len",
                      "32"])
    tokenizer = load_tokenizer(str(tiny_models["tiny-llama"]), cfg)
    first, second = build_text_datasets(cfg, tokenizer), build_text_datasets(cfg, tokenizer)
    assert not first.from_cache and second.from_cache and second.template is None
    assert second.train.to_list() == first.train.to_list() and second.report == first.report
    cfg.data.overwrite_cache = True  # acts: cut again
    assert not build_text_datasets(cfg, tokenizer).from_cache
    cfg.data.overwrite_cache, cfg.data.cutoff_len = False, 16
    assert not build_text_datasets(cfg, tokenizer).from_cache
