"""Preference tuning from replies marked desirable or not (stage kto) end to end on the tiny demo model: LLaMA-Factory's
kto_tag data, the run directory and its metrics, parity with TRL's KTOTrainer run directly, stop and resume,
predict and export on its output, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import job_helpers
import pytest
from test_dpo import COLOURS, typed

from engine.rundir import read_events, read_status


def write_feedback(folder: Path, count: int = 16) -> Path:
    """A registry of our own, in LLaMA-Factory's kto_en_demo form (sharegpt messages and a boolean label mapped as
    kto_tag) and in alpaca form: every other reply names the colour asked for (desirable), the rest another."""
    folder.mkdir(parents=True, exist_ok=True)
    sharegpt, alpaca = [], []
    for i in range(count):
        asked, good = COLOURS[i % len(COLOURS)], i % 2 == 0
        prompt, reply = f"Name the colour {asked}, number {i}.", f"The colour is {asked if good else COLOURS[(i + 3) % len(COLOURS)]}."
        sharegpt.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                         "label": good})
        alpaca.append({"instruction": prompt, "output": reply, "kto_tag": "true" if good else "false"})
    (folder / "feedback.json").write_text(json.dumps(sharegpt))
    (folder / "feedback_alpaca.json").write_text(json.dumps(alpaca))
    registry = {
        "feedback": {"file_name": "feedback.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "kto_tag": "label"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant"}},
        "feedback_alpaca": {"file_name": "feedback_alpaca.json",
                            "columns": {"prompt": "instruction", "response": "output", "kto_tag": "kto_tag"}},
    }
    (folder / "dataset_info.json").write_text(json.dumps(registry))
    return folder


def kto_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "kto", "--model_name_or_path", "tiny-llama", "--dataset", "feedback",
            "--dataset_dir", str(data), "--template", "llama2", "--output_dir", str(out), "--cutoff_len", "64",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-3", *extra]


def losses(out: Path) -> list[float]:
    return [e["loss"] for e in read_events(out) if e["type"] == "log"]


def test_a_kto_run_trains_on_tagged_replies_and_predict_and_export_work_on_it(tiny_models, tmp_path):
    data, out = write_feedback(tmp_path / "data"), tmp_path / "kto"
    code, output = typed(*kto_args(data, out, "--max_steps", "3", "--plot_loss"))
    assert code == 0, output
    status = read_status(out)
    assert status.state == "completed" and status.step == 3 and status.method == "kto-lora"
    assert "train: 16 samples tokenized with template llama2 (8 desirable)" in (out / "train.log").read_text()
    logs = [e for e in read_events(out) if e["type"] == "log"]
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # 1 - sigmoid(0): the model is its reference
    assert {"kl", "rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(logs[-1]["metrics"])
    assert logs[-1]["tokens_seen"] > 0
    for figure in ("training_loss.png", "training_rewards_chosen.png"):  # LLaMA-Factory's keys for stage kto
        assert (out / figure).read_bytes()[:4] == b"\x89PNG", figure
    assert "stage: kto" in (out / "config.yaml").read_text()
    code, output = typed("predict", "--run", str(out), "--dataset", "demo_alpaca", "--max_samples", "2",
                         "--max_new_tokens", "2")
    assert code == 0, output
    code, output = typed("export", "--run", str(out), "--export_dir", str(tmp_path / "merged"))
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file(), output


@pytest.mark.parametrize(("weights", "first"), [((), 0.5), (("--kto_chosen_weight", "2"), 0.75),
                                                (("--kto_rejected_weight", "3"), 1.0)])
def test_kto_chosen_and_rejected_weights_weigh_the_two_kinds_of_reply(tiny_models, tmp_path, weights, first):
    """At the first step every reply's loss is 1 - sigmoid(0) = 0.5, weighted by its kind: one batch of the 8
    samples, 4 desirable (alpaca records, kto_tag as text)."""
    data, out = write_feedback(tmp_path / "data", count=8), tmp_path / "kto"
    code, output = typed(*kto_args(data, out, "--dataset", "feedback_alpaca", "--per_device_train_batch_size", "8",
                                   "--max_steps", "1", *weights))
    assert code == 0, output
    assert losses(out) == [pytest.approx(first, abs=1e-4)]


def test_kto_losses_equal_trls_kto_trainer_run_directly(tiny_models, tmp_path):
    """The same samples (shuffled with the run's seed, as tuner gives them to TRL), model and settings through TRL's
    KTOTrainer by hand: the same loss at every step (a full fine-tune, whose reference TRL loads itself)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import KTOConfig

    from engine.config.schema import build_config
    from engine.data.loaders import load_conversations
    from engine.data.pairs import encode_feedback
    from engine.models.loading import load_tokenizer
    from engine.train.kto import pretokenized_kto_trainer

    data, out = write_feedback(tmp_path / "data"), tmp_path / "ours"
    settings = ["--finetuning_type", "full", "--max_steps", "3", "--learning_rate", "1e-4", "--pref_beta", "0.2",
                "--kto_rejected_weight", "1.5", "--gradient_checkpointing", "false", "--seed", "7"]
    code, output = typed(*kto_args(data, out, *settings))
    assert code == 0, output

    model_path = str(tiny_models["tiny-llama"])
    tokenizer = load_tokenizer(model_path, build_config({"model_name_or_path": model_path}))
    samples = load_conversations("feedback", str(data), kind="feedback").train
    rows, *_ = encode_feedback(samples, tokenizer, "llama2", 64)
    set_seed(7)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-4,
                     logging_steps=1, seed=7, use_cpu=True, report_to=[], beta=0.2, undesirable_weight=1.5,
                     max_length=None, save_strategy="no", disable_tqdm=True, bf16=False)
    trainer = pretokenized_kto_trainer()(model=model, args=args, processing_class=tokenizer,
                                         train_dataset=Dataset.from_list(rows).shuffle(seed=7))
    trainer.train()
    theirs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses(out) == pytest.approx(theirs, rel=1e-4)
    assert len(theirs) == 3 and theirs[0] != theirs[-1]


def test_a_kto_run_stops_with_a_checkpoint_and_resumes_from_it(tiny_models, tmp_path):
    data, out = write_feedback(tmp_path / "data", count=256), tmp_path / "kto"
    code, output = typed(*kto_args(data, out, "--max_steps", "400", "--save_steps", "2",
                                   "--per_device_train_batch_size", "2", "--detach"))
    assert code == 0, output
    job_helpers.stops_and_resumes(out)


@pytest.mark.parametrize(("extra", "said"), [
    (["--per_device_train_batch_size", "1"], "KTO's KL term pairs each prompt with another sample's reply"),
    (["--pref_loss", "orpo"], "pref_loss orpo: stage kto does not take it"),
    (["--kto_chosen_weight", "0"], "kto_chosen_weight 0.0: a weight is more than 0"),
])
def test_what_stage_kto_cannot_act_on_is_refused_in_one_line(tiny_models, tmp_path, extra, said):
    data = write_feedback(tmp_path / "data", count=4)
    code, output = typed(*kto_args(data, tmp_path / "out", *extra))
    assert code == 2 and said in output and "Traceback" not in output, output
    assert not (tmp_path / "out").exists()


def test_a_dataset_without_kto_tags_is_refused_by_stage_kto(tiny_models, tmp_path):
    code, output = typed("train", "--stage", "kto", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca",
                         "--output_dir", str(tmp_path / "out"), "--max_steps", "1")
    assert code == 2 and "has no kto_tag column: stage kto learns from replies marked" in output
    assert "Traceback" not in output and read_status(tmp_path / "out").state == "failed"


def test_kto_weights_are_refused_by_stage_dpo_and_supervised_training_learns_only_desirable_replies(tmp_path):
    from engine.data.loaders import load_conversations

    data = write_feedback(tmp_path / "data", count=4)
    code, output = typed("train", "--stage", "dpo", "--model_name_or_path", "tiny-llama", "--dataset", "demo_pairs",
                         "--kto_rejected_weight", "2", "--output_dir", str(tmp_path / "a"))
    assert code == 2 and "kto_rejected_weight 2.0 acts in preference tuning: set stage kto" in output
    loaded = load_conversations("feedback", str(data))
    assert len(loaded.train) == 2 and loaded.report.lines()[0].endswith("dropped 2 samples with kto_tag false (an "
                                                                         "undesirable reply)")


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_data_is_tokenized_once_and_loaded_from_the_cache_after(tiny_models, tmp_path, stage):
    """As supervised data (test_speed.py): the same pairs or judged replies again come from the cache, the same rows
    and report; other data (a label flipped, a reply changed) is a new entry."""
    import uuid

    from engine.config.schema import parse_args
    from engine.data.pairs import build_pair_datasets
    from engine.models.loading import load_tokenizer

    tag = uuid.uuid4().hex[:8]  # data no earlier test run has seen: the cache outlives the run
    data = tmp_path / "data.json"
    kind = "pairs" if stage == "dpo" else "feedback"
    records = [{"instruction": f"Say {tag} {i}.", "chosen": f"{tag} {i}!", "rejected": "No."} for i in range(12)] \
        if stage == "dpo" else \
        [{"instruction": f"Say {tag} {i}.", "output": f"{tag} {i}!", "kto_tag": i % 2 == 0} for i in range(12)]
    data.write_text(json.dumps(records))
    cfg = parse_args(["--stage", stage, "--model_name_or_path", "tiny-llama", "--dataset", str(data), "--template",
                      "llama2"])
    tokenizer = load_tokenizer(str(tiny_models["tiny-llama"]), cfg)
    first = build_pair_datasets(cfg, tokenizer, kind=kind)
    second = build_pair_datasets(cfg, tokenizer, kind=kind)
    assert not first.from_cache and second.from_cache
    assert second.train.to_list() == first.train.to_list() and second.report == first.report
    assert second.lengths == first.lengths
    cfg.data.overwrite_cache = True  # acts: prepared again
    assert not build_pair_datasets(cfg, tokenizer, kind=kind).from_cache
    cfg.data.overwrite_cache = False
    changed = "rejected" if stage == "dpo" else "kto_tag"
    records[3][changed] = "Nope." if stage == "dpo" else not records[3][changed]
    data.write_text(json.dumps(records))
    assert not build_pair_datasets(cfg, tokenizer, kind=kind).from_cache


def test_kto_takes_a_ref_model(tiny_models, tmp_path):
    """ref_model replaces LoRA's copy of the adapter: the base model itself is the reference of a fresh adapter, so
    the first loss is 1 - sigmoid(0) = 0.5 as without it."""
    data, out = write_feedback(tmp_path / "data", count=8), tmp_path / "kto"
    code, output = typed(*kto_args(data, out, "--max_steps", "1", "--ref_model", "tiny-llama"))
    assert code == 0, output
    assert losses(out) == [pytest.approx(0.5, abs=1e-3)]
    assert "reference: tiny-llama" in (out / "train.log").read_text()
