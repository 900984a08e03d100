"""Reward models (stage rm) end to end on the tiny demo model: ranking pairs scored by the decoder under a score head,
the run directory and its metrics, parity with TRL's RewardTrainer run directly, stop and resume, predict (scores
and accuracy) and export (with the head), starting from an SFT run, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import job_helpers
import pytest
from test_dpo import typed, write_pairs

from engine.rundir import read_events, read_status


def rm_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "rm", "--model_name_or_path", "tiny-llama", "--dataset", "pairs_alpaca",
            "--dataset_dir", str(data), "--template", "llama2", "--output_dir", str(out), "--cutoff_len", "64",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-3", *extra]


def predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "generated_predictions.jsonl").read_text().splitlines()]


def test_a_reward_model_trains_scores_pairs_and_exports_with_its_head(tiny_models, tmp_path):
    data, out = write_pairs(tmp_path / "data"), tmp_path / "rm"
    code, output = typed(*rm_args(data, out, "--max_steps", "4", "--val_size", "8", "--eval_strategy", "steps",
                                  "--eval_steps", "2", "--plot_loss"))
    assert code == 0, output
    status = read_status(out)
    assert status.state == "completed" and status.step == 4 and status.method == "rm-lora"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as saved:
        assert "base_model.model.score.weight" in saved.keys()  # the head, trained whole, saved with the adapter
    start = next(e for e in read_events(out) if e["type"] == "start")
    speed = {f["feature"]: f for f in start["speed"]}
    assert speed["loss"]["value"] == "TRL's reward loss (chosen scored above rejected)"
    logs = [e for e in read_events(out) if e["type"] == "log"]
    assert len(logs) == 4 and {"accuracy", "margin", "mean_reward"} <= set(logs[-1]["metrics"])
    assert logs[-1]["tokens_seen"] > 0
    evals = [e for e in read_events(out) if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and 0 <= evals[-1]["eval_accuracy"] <= 1
    for figure in ("training_loss.png", "training_eval_loss.png", "training_eval_accuracy.png"):  # LF's keys for rm
        assert (out / figure).read_bytes()[:4] == b"\x89PNG", figure
    assert "stage: rm" in (out / "config.yaml").read_text()

    code, output = typed("predict", "--run", str(out), "--output_dir", str(tmp_path / "scored"))
    assert code == 0 and "24 pairs scored" in output, output
    scored = predictions(tmp_path / "scored")
    assert len(scored) == 24 and scored[0]["prompt"].rstrip().endswith("[/INST]")
    assert all(isinstance(line["chosen"], float) and isinstance(line["rejected"], float) for line in scored)
    results = json.loads((tmp_path / "scored" / "predict_results.json").read_text())
    assert results["predict_accuracy"] == pytest.approx(sum(p["chosen"] > p["rejected"] for p in scored) / 24,
                                                        abs=0.05)
    assert results["predict_samples"] == 24 and results["predict_loss"] > 0

    code, output = typed("export", "--run", str(out), "--export_dir", str(tmp_path / "merged"))
    assert code == 0 and "a reward model with its score head" in output, output
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    code, output = typed("predict", "--model_name_or_path", str(tmp_path / "merged"), "--dataset", "pairs_alpaca",
                         "--dataset_dir", str(data), "--cutoff_len", "64", "--output_dir", str(tmp_path / "again"))
    assert code == 0, output
    assert [(p["chosen"], p["rejected"]) for p in predictions(tmp_path / "again")] == pytest.approx(
        [(p["chosen"], p["rejected"]) for p in scored], abs=1e-3)  # the exported model scores as the run's adapter

    code, output = typed("chat", "--run", str(out))
    assert code == 2 and "is a reward model (stage rm): it scores replies and writes none" in output
    assert "Traceback" not in output


def test_reward_losses_equal_trls_reward_trainer_run_directly(tiny_models, tmp_path):
    """The same pairs, model, head initialisation and settings through TRL's RewardTrainer by hand: the same loss
    at every step (a full fine-tune)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    from engine.config.schema import build_config
    from engine.data.loaders import load_conversations
    from engine.data.pairs import encode_pairs
    from engine.models.loading import load_tokenizer

    data, out = write_pairs(tmp_path / "data", count=16), tmp_path / "ours"
    code, output = typed(*rm_args(data, out, "--finetuning_type", "full", "--max_steps", "3", "--learning_rate",
                                  "1e-4", "--gradient_checkpointing", "false", "--seed", "7"))
    assert code == 0, output
    ours = [e["loss"] for e in read_events(out) if e["type"] == "log"]

    model_path = str(tiny_models["tiny-llama"])
    tokenizer = load_tokenizer(model_path, build_config({"model_name_or_path": model_path}))
    pairs = load_conversations("pairs_alpaca", str(data), kind="pairs").train
    rows, *_ = encode_pairs(pairs, tokenizer, "llama2", 64)
    whole = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
             for r in rows]
    set_seed(7)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3,
                        learning_rate=1e-4, logging_steps=1, seed=7, use_cpu=True, report_to=[], max_length=None,
                        save_strategy="no", disable_tqdm=True, bf16=False, disable_dropout=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(whole),
                            processing_class=tokenizer)
    trainer.train()
    theirs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert len(ours) == 3 and ours[0] != ours[-1]


def test_a_reward_run_stops_with_a_checkpoint_and_resumes_from_it(tiny_models, tmp_path):
    data, out = write_pairs(tmp_path / "data", count=64), tmp_path / "rm"
    code, output = typed(*rm_args(data, out, "--max_steps", "400", "--save_steps", "2",
                                  "--per_device_train_batch_size", "1", "--detach"))
    assert code == 0, output
    job_helpers.stops_and_resumes(out)


def test_qlora_and_freeze_reward_models_train_their_head_and_score(tiny_models, tmp_path):
    """QLoRA: the head trains in fp32 beside the 4-bit decoder (TRL casts a quantized model's trainable weights to
    bfloat16, which a plain layer cannot take on the CPU). Freeze: the head trains with the last layers, the whole
    reward model is saved, and LLaMA-Factory's --do_train --do_predict scores the pairs after training."""
    data = write_pairs(tmp_path / "data", count=8)
    out = tmp_path / "qlora"
    code, output = typed(*rm_args(data, out, "--max_steps", "2", "--quantization_bit", "4"))
    assert code == 0, output
    code, output = typed("predict", "--run", str(out), "--output_dir", str(out / "scored"))
    assert code == 0 and "8 pairs scored" in output, output
    code, output = typed(*rm_args(data, tmp_path / "freeze", "--max_steps", "2", "--finetuning_type", "freeze",
                                  "--do_train", "--do_predict"))
    assert code == 0 and "8 pairs scored" in output, output
    assert len(predictions(tmp_path / "freeze" / "predict")) == 8
    config = json.loads((tmp_path / "freeze" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    from safetensors import safe_open

    with safe_open(tmp_path / "freeze" / "model.safetensors", "pt") as saved:
        assert "score.weight" in saved.keys() and "lm_head.weight" not in saved.keys()
    code, output = typed("train", "--model_name_or_path", str(tmp_path / "freeze"), "--dataset", "demo_alpaca",
                         "--output_dir", str(tmp_path / "sft"), "--max_steps", "1")
    assert code == 2 and "is a reward model (LlamaForSequenceClassification)" in output
    assert "Traceback" not in output


def test_a_reward_model_starts_from_a_supervised_runs_adapter(tiny_models, tmp_path):
    """LLaMA-Factory's recipe: SFT, then a reward model from that run. The SFT adapter (a language model's) is merged
    into the decoder and a new adapter trains with the head; --do_predict after training, `predict --run` and the
    export all score with both, not with the reward adapter alone. A reward model's adapter is refused under a
    language model."""
    data, sft, rm = write_pairs(tmp_path / "data", count=8), tmp_path / "sft", tmp_path / "rm"
    code, output = typed("train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--template",
                         "llama2", "--output_dir", str(sft), "--max_steps", "3", "--max_samples", "24",
                         "--learning_rate", "5e-2")
    assert code == 0, output
    code, output = typed(*rm_args(data, rm, "--max_steps", "2", "--adapter_name_or_path", str(sft), "--do_train",
                                  "--do_predict"))
    assert code == 0 and "8 pairs scored" in output, output
    assert "merged 1 adapter(s) into the base" in (rm / "train.log").read_text()
    after_training = [(p["chosen"], p["rejected"]) for p in predictions(rm / "predict")]
    code, output = typed("predict", "--run", str(rm), "--output_dir", str(tmp_path / "scored"))
    assert code == 0, output
    assert [(p["chosen"], p["rejected"]) for p in predictions(tmp_path / "scored")] == after_training
    code, output = typed("predict", "--model_name_or_path", "tiny-llama", "--adapter_name_or_path", str(rm),
                         "--dataset", "pairs_alpaca", "--dataset_dir", str(data), "--template", "llama2",
                         "--cutoff_len", "64", "--output_dir", str(tmp_path / "alone"))
    assert code == 0, output
    alone = [(p["chosen"], p["rejected"]) for p in predictions(tmp_path / "alone")]
    assert alone != pytest.approx(after_training, abs=1e-3)  # the SFT adapter counts
    code, output = typed("export", "--run", str(rm), "--export_dir", str(tmp_path / "merged"))
    assert code == 0, output
    code, output = typed("predict", "--model_name_or_path", str(tmp_path / "merged"), "--dataset", "pairs_alpaca",
                         "--dataset_dir", str(data), "--cutoff_len", "64", "--output_dir", str(tmp_path / "exported"))
    assert code == 0, output
    assert [(p["chosen"], p["rejected"]) for p in predictions(tmp_path / "exported")] == pytest.approx(
        after_training, abs=1e-3)
    code, output = typed("train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca",
                         "--adapter_name_or_path", str(rm), "--output_dir", str(tmp_path / "back"), "--max_steps", "1")
    assert code == 2 and "is a reward model's (stage rm)" in output and "Traceback" not in output


def test_the_score_head_trains_in_fp32_under_lora_and_freeze(tiny_models):
    """The head trains whole: with LoRA, PEFT copies it in the load dtype (bfloat16 on a GPU), where the optimizer
    would lose small updates and fp16 gradients could not be unscaled, so it goes to fp32 as the LoRA matrices;
    with freeze it trains beside the last layers."""
    import torch

    from engine.config.schema import build_config
    from engine.models.loading import Precision, apply_method, load_model

    path = str(tiny_models["tiny-llama"])
    for method in ("lora", "freeze"):
        cfg = build_config({"model_name_or_path": path, "stage": "rm", "finetuning_type": method})
        model = apply_method(load_model(path, cfg, Precision("bf16", "test"), "sdpa", reward=True), cfg, False)
        head = {name: p for name, p in model.named_parameters() if "score" in name and p.requires_grad}
        assert head and all(p.dtype == torch.float32 for p in head.values()), (method, head.keys())


def test_pissa_convert_keeps_the_score_head(tiny_models, tmp_path):
    """PEFT's PiSSA conversion writes the LoRA matrices alone: the head trained whole is copied into the converted
    adapter, which then scores on the original base as the run's adapter does on PiSSA's."""
    data, out = write_pairs(tmp_path / "data", count=8), tmp_path / "rm"
    code, output = typed(*rm_args(data, out, "--max_steps", "2", "--pissa_init", "--pissa_iter", "-1",
                                  "--pissa_convert"))
    assert code == 0, output
    code, output = typed("predict", "--run", str(out), "--output_dir", str(tmp_path / "run"))
    assert code == 0, output
    code, output = typed("predict", "--model_name_or_path", "tiny-llama", "--adapter_name_or_path",
                         str(out / "pissa_converted"), "--dataset", "pairs_alpaca", "--dataset_dir", str(data),
                         "--template", "llama2", "--cutoff_len", "64", "--output_dir", str(tmp_path / "converted"))
    assert code == 0, output
    assert [(p["chosen"], p["rejected"]) for p in predictions(tmp_path / "converted")] == pytest.approx(
        [(p["chosen"], p["rejected"]) for p in predictions(tmp_path / "run")], abs=1e-3)


@pytest.mark.parametrize(("extra", "said"), [
    (["--packing", "true"], "stage rm trains each pair whole"),
    (["--pref_beta", "0.3"], "pref_beta 0.3 acts in preference tuning: set stage dpo or kto"),
    (["--dataset", "demo_alpaca"], "is not a preference (ranking) dataset"),
    (["--enable_liger_kernel", "true"], "stage rm computes its loss through TRL's own score head"),
])
def test_what_stage_rm_cannot_act_on_is_refused_in_one_line(tiny_models, tmp_path, extra, said):
    data = write_pairs(tmp_path / "data", count=4)
    code, output = typed(*rm_args(data, tmp_path / "out", *extra))
    assert code == 2 and said in output and "Traceback" not in output, output


def test_the_demo_reward_model_learns_on_held_out_pairs(tiny_models, tmp_path):
    """README's reward demo: on pairs it never trained on, the reward model comes to rank the right answer above a
    refusal or a wrong one (accuracy well above its random head's, the margin from about 0 to above 1)."""
    out = tmp_path / "demo_rm"
    code, output = typed("train", "--stage", "rm", "--model_name_or_path", "tiny-llama", "--dataset", "demo_pairs",
                         "--finetuning_type", "full", "--learning_rate", "1e-3", "--max_steps", "20",
                         "--per_device_train_batch_size", "8", "--val_size", "60", "--eval_strategy", "steps",
                         "--eval_steps", "20", "--eval_on_start", "true", "--output_dir", str(out))
    assert code == 0, output
    evals = [e for e in read_events(out) if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 20]
    assert abs(evals[0]["eval_margin"]) < 0.2 and evals[-1]["eval_margin"] > 1
    assert evals[-1]["eval_accuracy"] > 0.7 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2


def test_lora_dropout_acts_in_a_reward_model(tiny_models, tmp_path):
    """Stage rm keeps dropout on, as LLaMA-Factory's does (TRL's RewardConfig would turn it off): the same seeded run
    with lora_dropout trains differently from one without (at step 1 LoRA's B matrices are still zero, so after)."""
    data = write_pairs(tmp_path / "data", count=8)
    losses = {}
    for dropout in ("0", "0.5"):
        out = tmp_path / f"dropout_{dropout}"
        code, output = typed(*rm_args(data, out, "--max_steps", "3", "--lora_dropout", dropout, "--learning_rate",
                                      "1e-2"))
        assert code == 0, output
        losses[dropout] = [e["loss"] for e in read_events(out) if e["type"] == "log"]
    assert losses["0"][0] == pytest.approx(losses["0.5"][0], rel=1e-6)
    assert losses["0"][1:] != pytest.approx(losses["0.5"][1:], rel=1e-4)
