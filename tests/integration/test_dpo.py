"""Preference tuning (stage dpo) end to end on the tiny demo models: pairs in LLaMA-Factory's ranking formats, the
run directory and its metrics, parity with TRL's DPOTrainer run directly, stop and resume, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import job_helpers
import pytest

from engine.rundir import read_events, read_status

COLOURS = ("red", "blue", "green", "black", "white", "yellow", "purple", "orange")


def write_pairs(folder: Path, count: int = 24) -> Path:
    """A registry of our own: alpaca and sharegpt ranking pairs where the chosen reply names the colour asked for
    and the rejected one another."""
    folder.mkdir(parents=True, exist_ok=True)
    alpaca, sharegpt = [], []
    for i in range(count):
        asked, other = COLOURS[i % len(COLOURS)], COLOURS[(i + 3) % len(COLOURS)]
        prompt = f"Name the colour {asked}, number {i}."
        alpaca.append({"instruction": prompt, "input": "", "chosen": f"The colour is {asked}.",
                       "rejected": f"The colour is {other}."})
        sharegpt.append({"conversations": [{"from": "human", "value": prompt}],
                         "chosen": {"from": "gpt", "value": f"The colour is {asked}."},
                         "rejected": {"from": "gpt", "value": f"The colour is {other}."}})
    (folder / "pairs_alpaca.json").write_text(json.dumps(alpaca))
    (folder / "pairs_sharegpt.json").write_text(json.dumps(sharegpt))
    registry = {
        "pairs_alpaca": {"file_name": "pairs_alpaca.json", "ranking": True,
                         "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                     "rejected": "rejected"}},
        "pairs_sharegpt": {"file_name": "pairs_sharegpt.json", "ranking": True, "formatting": "sharegpt",
                           "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    }
    (folder / "dataset_info.json").write_text(json.dumps(registry))
    return folder


def dpo_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "dpo", "--model_name_or_path", "tiny-llama", "--dataset", "pairs_alpaca",
            "--dataset_dir", str(data), "--template", "llama2", "--output_dir", str(out), "--cutoff_len", "64",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-3", *extra]


def typed(*args: str) -> tuple[int, str]:
    done = job_helpers.tuner(*args, cwd=Path.cwd())
    return done.returncode, done.stdout + done.stderr


def test_a_dpo_run_trains_on_ranking_pairs_and_records_the_preference_metrics(tiny_models, tmp_path):
    data, out = write_pairs(tmp_path / "data"), tmp_path / "dpo"
    code, output = typed(*dpo_args(data, out, "--max_steps", "4", "--pref_beta", "0.2", "--plot_loss"))
    assert code == 0, output
    status = read_status(out)
    assert status.state == "completed" and status.step == 4 and status.method == "dpo-lora"
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_log.jsonl", "train_results.json"):
        assert (out / name).is_file(), name
    start = next(e for e in read_events(out) if e["type"] == "start")
    assert start["train_samples"] == 24
    speed = {f["feature"]: f for f in start["speed"]}
    assert speed["padding-free batches"]["on"] is False and speed["loss"]["value"] == "TRL's preference loss"
    logs = [e for e in read_events(out) if e["type"] == "log"]
    assert len(logs) == 4 and logs[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # ln 2: the model is its reference
    metrics = logs[-1]["metrics"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics)
    assert logs[-1]["tokens_seen"] > 0 and logs[-1]["tokens_per_s"] > 0
    lines = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert any(line.get("accuracy") is not None for line in lines)
    assert "stage: dpo" in (out / "config.yaml").read_text()
    for figure in ("training_loss.png", "training_rewards_accuracies.png"):  # LLaMA-Factory's keys for stage dpo
        assert (out / figure).read_bytes()[:4] == b"\x89PNG", figure


def test_sharegpt_pairs_tokenize_to_the_same_rows_as_alpaca_pairs(tiny_models, tmp_path):
    from engine.config.schema import build_config
    from engine.data.pairs import build_pair_datasets
    from engine.models.loading import load_tokenizer

    data = write_pairs(tmp_path / "data", count=8)
    rows = {}
    for name in ("pairs_alpaca", "pairs_sharegpt"):
        cfg = build_config({"model_name_or_path": str(tiny_models["tiny-llama"]), "dataset": name,
                            "dataset_dir": str(data), "template": "llama2", "stage": "dpo", "cutoff_len": 64})
        prepared = build_pair_datasets(cfg, load_tokenizer(str(tiny_models["tiny-llama"]), cfg))
        rows[name] = prepared.train.to_list()
    assert rows["pairs_alpaca"] == rows["pairs_sharegpt"]
    tokenizer = load_tokenizer(str(tiny_models["tiny-llama"]), cfg)
    first = rows["pairs_alpaca"][0]
    assert tokenizer.decode(first["prompt_ids"]).rstrip().endswith("[/INST]")
    assert "red" in tokenizer.decode(first["chosen_ids"]) and "black" in tokenizer.decode(first["rejected_ids"])


def test_pairs_are_cut_to_cutoff_len_as_llamafactory_cuts_them(tiny_models):
    from engine.config.schema import build_config
    from engine.data.pairs import encode_pairs
    from engine.models.loading import load_tokenizer
    from engine.templates import infer_seqlen

    cfg = build_config({"model_name_or_path": str(tiny_models["tiny-llama"])})
    tokenizer = load_tokenizer(str(tiny_models["tiny-llama"]), cfg)
    pair = {"messages": [{"role": "user", "content": "word " * 40}], "chosen": "yes " * 30, "rejected": "no " * 5}
    [whole], _, [length], cut = encode_pairs([pair], tokenizer, "llama2", 4096)
    [row], _, _, truncated = encode_pairs([pair], tokenizer, "llama2", 32)
    source, target = infer_seqlen(len(whole["prompt_ids"]), len(whole["chosen_ids"]), 32)
    assert (cut, truncated) == (0, 1) and length == len(whole["prompt_ids"]) + len(whole["chosen_ids"])
    assert row["prompt_ids"] == whole["prompt_ids"][:source] and row["chosen_ids"] == whole["chosen_ids"][:target]
    assert row["rejected_ids"] == whole["rejected_ids"][:target]


def test_dpo_losses_equal_trls_dpo_trainer_run_directly(tiny_models, tmp_path):
    """The same pairs, model and settings through TRL's DPOTrainer by hand: the same loss at every step (sigmoid loss
    with pref_ftx's supervised term, a full fine-tune whose reference TRL loads itself)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import DPOConfig

    from engine.config.schema import build_config
    from engine.data.pairs import encode_pairs
    from engine.data.loaders import load_conversations
    from engine.models.loading import load_tokenizer
    from engine.train.dpo import pretokenized_dpo_trainer

    data, out = write_pairs(tmp_path / "data", count=16), tmp_path / "ours"
    settings = ["--finetuning_type", "full", "--max_steps", "3", "--learning_rate", "1e-4", "--pref_ftx", "0.5",
                "--gradient_checkpointing", "false", "--seed", "7"]
    code, output = typed(*dpo_args(data, out, *settings))
    assert code == 0, output
    ours = [e["loss"] for e in read_events(out) if e["type"] == "log"]

    model_path = str(tiny_models["tiny-llama"])
    cfg = build_config({"model_name_or_path": model_path})
    tokenizer = load_tokenizer(model_path, cfg)
    pairs = load_conversations("pairs_alpaca", str(data), kind="pairs").train
    rows, *_ = encode_pairs(pairs, tokenizer, "llama2", 64)
    set_seed(7)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-4,
                     logging_steps=1, seed=7, use_cpu=True, report_to=[], beta=0.1, loss_type=["sigmoid", "sft"],
                     loss_weights=[1.0, 0.5], max_length=None, save_strategy="no", disable_tqdm=True)
    trainer = pretokenized_dpo_trainer()(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                         processing_class=tokenizer)
    trainer.train()
    theirs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert len(ours) == 3 and ours[0] != ours[-1]


@pytest.mark.parametrize("loss", ["sigmoid", "orpo"])  # TRL's DPOTrainer; its ORPOTrainer (no reference)
def test_a_dpo_run_stops_with_a_checkpoint_and_resumes_from_it(tiny_models, tmp_path, loss):
    data, out = write_pairs(tmp_path / "data", count=64), tmp_path / "dpo"
    code, output = typed(*dpo_args(data, out, "--max_steps", "400", "--save_steps", "2", "--per_device_train_batch_size",
                                   "1", "--pref_loss", loss, "--detach"))
    assert code == 0, output
    job_helpers.stops_and_resumes(out)


@pytest.mark.parametrize(("extra", "said"), [
    (["--packing", "true"], "stage dpo trains each pair whole"),
    (["--pref_loss", "dpop"], "pref_loss: 'dpop' is not one of sigmoid, hinge, ipo, orpo, simpo"),
    (["--ld_alpha", "2"], "ld_alpha 2.0: LD-DPO's alpha is between 0 and 1"),
    (["--lora_dropout", "0.05"], "lora_dropout 0.05: TRL's preference trainers turn dropout off"),
    (["--pref_loss", "simpo", "--ld_alpha", "0.5"], "ld_alpha acts through TRL's DPOTrainer"),
    (["--pref_loss", "orpo", "--ref_model", "tiny-llama"], "ref_model: pref_loss orpo trains without a reference"),
    (["--ref_model_quantization_bit", "4"], "ref_model_adapters and ref_model_quantization_bit load ref_model: give "
                                            "ref_model too"),
    (["--ref_model", "tiny-llama", "--ref_model_adapters", "/nonexistent/sft"], "ref_model_adapters /nonexistent/sft: "
                                                                                 "no such directory"),
    (["--ref_model", "org/not-downloaded"], "ref_model org/not-downloaded is not downloaded: fetch it first with "
                                            "`tuner download org/not-downloaded`"),
])
def test_what_stage_dpo_cannot_act_on_is_refused_in_one_line(tmp_path, extra, said):
    data = write_pairs(tmp_path / "data", count=4)
    code, output = typed(*dpo_args(data, tmp_path / "out", *extra))
    assert code == 2 and said in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_supervised_data_is_refused_by_stage_dpo_and_pairs_by_stage_sft(tiny_models, tmp_path):
    data = write_pairs(tmp_path / "data", count=4)
    code, output = typed("train", "--stage", "dpo", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca",
                         "--output_dir", str(tmp_path / "a"), "--max_steps", "1")
    assert code == 2 and "is not a preference (ranking) dataset" in output and "Traceback" not in output
    code, output = typed("train", "--model_name_or_path", "tiny-llama", "--dataset", "pairs_alpaca", "--dataset_dir",
                         str(data), "--output_dir", str(tmp_path / "b"), "--max_steps", "1")
    assert code == 2 and "set stage dpo (or rm, for a reward model) to train on it" in output
    code, output = typed("train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--pref_beta",
                         "0.3", "--output_dir", str(tmp_path / "c"))
    assert code == 2 and "pref_beta 0.3 acts in preference tuning" in output


def test_dpo_continues_from_a_supervised_runs_adapter_which_is_its_reference(tiny_models, tmp_path):
    """LLaMA-Factory's recipe: SFT, then DPO from that run's adapter (adapter_name_or_path). The adapter trains on,
    and the reference is the SFT model (TRL keeps a frozen copy of the adapter as it starts): the first loss is ln 2
    although the adapter is not the base model."""
    data, sft, dpo = write_pairs(tmp_path / "data"), tmp_path / "sft", tmp_path / "dpo"
    code, output = typed("train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--template",
                         "llama2", "--output_dir", str(sft), "--max_steps", "3", "--learning_rate", "1e-2",
                         "--max_samples", "24")
    assert code == 0, output
    code, output = typed(*dpo_args(data, dpo, "--max_steps", "2", "--adapter_name_or_path", str(sft)))
    assert code == 0, output
    logs = [e for e in read_events(dpo) if e["type"] == "log"]
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=2e-3)
    assert json.loads((dpo / "adapter_config.json").read_text())["r"] == json.loads(
        (sft / "adapter_config.json").read_text())["r"]


def test_the_demo_preference_is_learned_on_held_out_pairs(tiny_models, tmp_path):
    """README's preference demo, shortened: on pairs it never trained on, the model comes to prefer the right answer
    to a refusal or a wrong one (reward accuracy from 0, every pair a tie, to well above chance)."""
    out = tmp_path / "demo_dpo"
    code, output = typed("train", "--stage", "dpo", "--model_name_or_path", "tiny-llama", "--dataset", "demo_pairs",
                         "--finetuning_type", "full", "--learning_rate", "1e-3", "--max_steps", "20",
                         "--per_device_train_batch_size", "8", "--val_size", "60", "--eval_strategy", "steps",
                         "--eval_steps", "20", "--eval_on_start", "true", "--output_dir", str(out))
    assert code == 0, output
    evals = [e for e in read_events(out) if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 20]
    assert evals[0]["eval_rewards/accuracies"] == 0 and evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert evals[-1]["eval_rewards/accuracies"] > 0.65 and evals[-1]["eval_rewards/margins"] > 0.5


def test_preview_shows_a_pair_as_the_model_sees_it(tiny_models, tmp_path):
    from engine.config.schema import build_config
    from engine.data.preview import build_preview

    data = write_pairs(tmp_path / "data", count=6)
    cfg = build_config({"model_name_or_path": "tiny-llama", "dataset": "pairs_sharegpt", "dataset_dir": str(data),
                        "template": "llama2", "stage": "dpo", "cutoff_len": 64})
    preview = build_preview(cfg, count=2)
    assert preview.samples == [] and len(preview.pairs) == 2 and preview.stats["count"] == 6
    first = preview.pairs[0]
    assert first.prompt.endswith("[/INST]") and "Name the colour red, number 0." in first.prompt
    assert first.chosen.strip().startswith("The colour is red.") and "black" in first.rejected
    assert first.tokens["prompt"] > 0 and first.tokens["chosen"] > 3 and first.tokens["rejected"] > 3
    assert preview.to_json()["pairs"][0]["chosen"] == first.chosen


def test_a_pissa_adapter_is_copied_as_the_reference_without_running_pissa_again(tiny_models, tmp_path):
    """TRL copies the trained adapter's config for the reference: PiSSA's initialisation would run again and change
    the base weights under both. The model built for DPO still computes what the model it was given computed."""
    import torch

    from engine.config.schema import build_config
    from engine.data.pairs import build_pair_datasets
    from engine.memory.autofit import Fit
    from engine.models.loading import Hardware, Precision, apply_method, load_model, load_tokenizer
    from engine.rundir.run import RunDir
    from engine.rundir.status import RunStatus
    from engine.train.callbacks import Divergence
    from engine.train.dpo import DPO
    from engine.train.speed import SpeedPlan
    from engine.train.stage import TrainerParts
    from engine.train.strategy import World, prepare_strategy
    from engine.models.kernels import LigerChoice

    path = str(tiny_models["tiny-llama"])
    data = write_pairs(tmp_path / "data", count=4)
    cfg = build_config({"model_name_or_path": path, "dataset": "pairs_alpaca", "dataset_dir": str(data),
                        "template": "llama2", "stage": "dpo", "cutoff_len": 64, "pissa_init": True, "pissa_iter": -1,
                        "output_dir": str(tmp_path / "out")})
    tokenizer = load_tokenizer(path, cfg)
    model = apply_method(load_model(path, cfg, Precision("fp32", "test"), "sdpa"), cfg, False)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    run = RunDir(tmp_path / "out", None, RunStatus(id="t", name="out"))
    run.path.mkdir()
    plan = SpeedPlan(False, "test", "sdpa", "test", LigerChoice(False, "test"), Fit(2, 1, False, reason="test"), False,
                     64, "preference", "test")
    parts = TrainerParts(cfg, model, tokenizer, build_pair_datasets(cfg, tokenizer), Precision("fp32", "test"),
                         Hardware(False, False, False, "cpu"), run, [], Divergence(),
                         prepare_strategy(cfg, run.path, path, "fp32", World(1)), path)
    trainer = DPO.trainer(parts, plan)
    with torch.no_grad():
        after = trainer.model(input_ids=ids).logits
    assert "ref" in trainer.model.peft_config and torch.allclose(before, after, atol=1e-4)
    assert trainer.model.peft_config["default"].init_lora_weights == "pissa"  # as saved for pissa_convert


@pytest.mark.parametrize(("loss", "first"), [("sigmoid", 0.6931), ("hinge", 1.0), ("ipo", (1 / 0.6) ** 2)])
def test_pref_loss_and_pref_beta_choose_the_loss_trained(tiny_models, tmp_path, loss, first):
    """At the first step the model is its reference (every margin 0): sigmoid gives ln 2, hinge 1, and IPO
    (1 / (2 beta))^2, here with pref_beta 0.3."""
    data, out = write_pairs(tmp_path / "data", count=8), tmp_path / loss
    code, output = typed(*dpo_args(data, out, "--max_steps", "1", "--pref_loss", loss, "--pref_beta", "0.3"))
    assert code == 0, output
    assert [e["loss"] for e in read_events(out) if e["type"] == "log"] == [pytest.approx(first, abs=2e-3)]


def test_ref_model_and_its_adapters_are_the_reference(tiny_models, tmp_path):
    """LLaMA-Factory's ref_model keys: DPO continues an SFT run's adapter; against the base model as ref_model the
    first loss is off ln 2 (the policy starts as the SFT model), against the base with the SFT adapter
    (ref_model_adapters) it is ln 2 again; a 4-bit reference (ref_model_quantization_bit) of the base under a fresh
    adapter is ln 2 but for the rounding of its weights."""
    data, sft = write_pairs(tmp_path / "data"), tmp_path / "sft"
    code, output = typed("train", "--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--template",
                         "llama2", "--output_dir", str(sft), "--max_steps", "3", "--learning_rate", "1e-2",
                         "--max_samples", "24")
    assert code == 0, output
    first = {}
    for name, extra in (("base", ["--adapter_name_or_path", str(sft), "--ref_model", "tiny-llama"]),
                        ("sft", ["--adapter_name_or_path", str(sft), "--ref_model", "tiny-llama",
                                 "--ref_model_adapters", str(sft)]),
                        ("4bit", ["--ref_model", "tiny-llama", "--ref_model_quantization_bit", "4"])):
        out = tmp_path / f"against_{name}"
        code, output = typed(*dpo_args(data, out, "--max_steps", "1", *extra))
        assert code == 0, output
        first[name] = next(e["loss"] for e in read_events(out) if e["type"] == "log")
    assert abs(first["base"] - 0.6931) > 5e-3 and first["sft"] == pytest.approx(0.6931, abs=2e-3)
    assert first["4bit"] == pytest.approx(0.6931, abs=0.05) and first["4bit"] != pytest.approx(0.6931, abs=1e-5)
    assert "reference: tiny-llama, 4-bit" in (tmp_path / "against_4bit" / "train.log").read_text()


def test_ld_alpha_weighs_the_longer_replys_tail(tiny_models, tmp_path):
    """TRL's LD-DPO: ld_alpha 1 is plain DPO, step for step; 0 counts each reply only as far as the shorter one goes,
    so on demo_pairs (a refusal is longer than most answers) the training goes another way."""
    losses = {}
    for name, extra in (("plain", []), ("one", ["--ld_alpha", "1"]), ("zero", ["--ld_alpha", "0"])):
        out = tmp_path / name
        code, output = typed("train", "--stage", "dpo", "--model_name_or_path", "tiny-llama", "--dataset",
                             "demo_pairs", "--max_samples", "24", "--output_dir", str(out), "--max_steps", "3",
                             "--per_device_train_batch_size", "8", "--logging_steps", "1", "--learning_rate", "1e-2",
                             *extra)
        assert code == 0, output
        losses[name] = [e["loss"] for e in read_events(out) if e["type"] == "log"]
    assert losses["one"] == pytest.approx(losses["plain"], rel=1e-5)
    assert losses["zero"][0] == pytest.approx(0.6931, abs=2e-3)  # the reference is the policy at the start
    assert losses["zero"][1:] != pytest.approx(losses["plain"][1:], rel=1e-3)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_precomputed_reference_log_probs_train_as_a_held_reference_does(tiny_models, tmp_path, stage):
    """TRL's precompute_ref_log_probs: a full fine-tune's reference scores the data once, with the model as it
    starts, and no second model is loaded; the losses are those of a run holding the reference."""
    from test_kto import write_feedback

    data = write_pairs(tmp_path / "data", count=16) if stage == "dpo" else write_feedback(tmp_path / "data", count=16)
    common = ["--stage", stage, "--dataset", "pairs_alpaca" if stage == "dpo" else "feedback", "--finetuning_type",
              "full", "--max_steps", "3", "--learning_rate", "1e-4", "--gradient_checkpointing", "false"]
    losses = {}
    for name, extra in (("held", []), ("precomputed", ["--precompute_ref_log_probs", "true"])):
        code, output = typed(*dpo_args(data, tmp_path / name, *common, *extra))
        assert code == 0, output
        losses[name] = [e["loss"] for e in read_events(tmp_path / name) if e["type"] == "log"]
    assert losses["precomputed"] == pytest.approx(losses["held"], rel=1e-4)
    assert "no second model held" in (tmp_path / "precomputed" / "train.log").read_text()
