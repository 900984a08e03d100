"""LLaMA-Factory's other preference losses under stage dpo, on the tiny demo model: ORPO and SimPO (no reference,
TRL's ORPOTrainer and CPOTrainer), conservative DPO (dpo_label_smoothing) and the BCO mix (pref_bco_weight).

With one pair per step, what TRL logs for the step (the pair's rewards, its supervised loss) gives the loss
LLaMA-Factory's formula makes of them, so each test checks the key acts as it does there.
"""

from __future__ import annotations

import math

import pytest
from test_dpo import dpo_args, typed, write_pairs

from engine.rundir import read_events


def minus_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x)) if x > -30 else -x


def logged(out) -> list[dict]:
    return [e for e in read_events(out) if e["type"] == "log"]


ONE_PAIR_A_STEP = ("--per_device_train_batch_size", "1", "--max_steps", "3", "--learning_rate", "2e-2")


def test_orpo_trains_without_a_reference_and_its_losses_equal_trls_orpo_trainer_run_directly(tiny_models, tmp_path):
    """A full fine-tune with pref_loss orpo: LLaMA-Factory's loss at each step (minus the chosen replies' mean token
    log-probability, plus pref_beta x the odds-ratio loss; the prompt not learned), the same losses as
    trl.experimental's ORPOTrainer (with that supervised term) on the same pairs and settings, no reference model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed

    from engine.config.schema import build_config
    from engine.data.loaders import load_conversations
    from engine.data.pairs import encode_pairs
    from engine.models.loading import load_tokenizer
    from engine.train.reference_free import _trl_classes, pretokenized, trl_rows

    data, out = write_pairs(tmp_path / "data", count=16), tmp_path / "ours"
    settings = ["--finetuning_type", "full", "--max_steps", "3", "--learning_rate", "1e-4", "--pref_loss", "orpo",
                "--pref_beta", "0.2", "--gradient_checkpointing", "false", "--seed", "7"]
    code, output = typed(*dpo_args(data, out, *settings))
    assert code == 0, output
    logs = logged(out)
    for log in logs:
        m = log["metrics"]
        assert m["nll_loss"] == pytest.approx(-m["logps/chosen"], abs=1e-5)  # the reply's, not the prompt's
        assert log["loss"] == pytest.approx(-m["logps/chosen"] - 0.2 * m["log_odds_ratio"], abs=1e-4)
    assert logs[-1]["tokens_seen"] > 0 and logs[-1]["tokens_per_s"] > 0
    start = next(e for e in read_events(out) if e["type"] == "start")
    assert {f["feature"]: f for f in start["speed"]}["loss"]["why"].endswith("no reference")
    assert "pref_loss: orpo" in (out / "config.yaml").read_text()

    model_path = str(tiny_models["tiny-llama"])
    tokenizer = load_tokenizer(model_path, build_config({"model_name_or_path": model_path}))
    rows, *_ = encode_pairs(load_conversations("pairs_alpaca", str(data), kind="pairs").train, tokenizer, "llama2", 64)
    (config_class, trainer_class), _ = _trl_classes()
    set_seed(7)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    args = config_class(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=3,
                        learning_rate=1e-4, logging_steps=1, seed=7, use_cpu=True, report_to=[], beta=0.2,
                        max_length=64, save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = pretokenized(trainer_class)(model=model, args=args, processing_class=tokenizer,
                                          train_dataset=trl_rows(Dataset.from_list(rows)))
    trainer.train()
    theirs = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert [log["loss"] for log in logs] == pytest.approx(theirs, rel=1e-4)
    assert len(theirs) == 3 and theirs[0] != theirs[-1]


def test_simpo_gamma_and_pref_ftx_act_as_in_llamafactorys_simpo_loss(tiny_models, tmp_path):
    """-log sigmoid(margin - simpo_gamma) + pref_ftx x the supervised loss, the margin being pref_beta x the
    difference of the replies' mean token log-probabilities (TRL's rewards/margins)."""
    data, out = write_pairs(tmp_path / "data", count=8), tmp_path / "simpo"
    code, output = typed(*dpo_args(data, out, *ONE_PAIR_A_STEP, "--pref_loss", "simpo", "--simpo_gamma", "0.3",
                                   "--pref_beta", "2", "--pref_ftx", "0.5"))
    assert code == 0, output
    logs = logged(out)
    assert len(logs) == 3 and any(log["metrics"]["rewards/margins"] != 0 for log in logs)
    for log in logs:
        m = log["metrics"]
        expected = minus_log_sigmoid(m["rewards/margins"] - 0.3) + 0.5 * m["nll_loss"]
        assert log["loss"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("smoothing", "bco"), [("0.2", "0"), ("0.2", "0.5")])
def test_dpo_label_smoothing_and_pref_bco_weight_act_as_in_llamafactory(tiny_models, tmp_path, smoothing, bco):
    """Conservative DPO, -(1 - e) log s(m) - e log s(-m), mixed with BCO's -log s(c) - log s(-r) as
    (dpo + w x bco) / (1 + w); m, c and r are the pair's reward margin, chosen and rejected reward."""
    data, out = write_pairs(tmp_path / "data", count=8), tmp_path / "dpo"
    code, output = typed(*dpo_args(data, out, *ONE_PAIR_A_STEP, "--dpo_label_smoothing", smoothing,
                                   "--pref_bco_weight", bco))
    assert code == 0, output
    e, w = float(smoothing), float(bco)
    logs = logged(out)
    assert any(log["metrics"]["rewards/margins"] != 0 for log in logs)
    for log in logs:
        m = log["metrics"]
        margin = m["rewards/margins"]
        dpo = (1 - e) * minus_log_sigmoid(margin) + e * minus_log_sigmoid(-margin)
        bco_loss = minus_log_sigmoid(m["rewards/chosen"]) + minus_log_sigmoid(-m["rewards/rejected"])
        assert log["loss"] == pytest.approx((dpo + w * bco_loss) / (1 + w), abs=1e-4)


@pytest.mark.parametrize(("extra", "said"), [
    (["--pref_loss", "orpo", "--pref_ftx", "0.5"], "ORPO's loss holds the supervised loss"),
    (["--pref_loss", "simpo", "--pref_bco_weight", "0.5"], "pref_loss simpo has none"),
    (["--pref_loss", "hinge", "--dpo_label_smoothing", "0.1"], "acts on the sigmoid (DPO) loss only"),
    (["--dpo_label_smoothing", "0.5"], "is at least 0 and below 0.5"),
    (["--simpo_gamma", "1"], "set pref_loss simpo, or leave simpo_gamma out"),
    (["--pref_loss", "kto_pair"], "TRL 1.16 no longer has it"),
])
def test_a_preference_key_that_cannot_act_is_refused_in_one_line(tmp_path, extra, said):
    data = write_pairs(tmp_path / "data", count=4)
    code, output = typed(*dpo_args(data, tmp_path / "out", *extra))
    assert code == 2 and said in output and "Traceback" not in output, output
    assert not (tmp_path / "out").exists()


def test_a_supervised_setting_the_losss_trl_trainer_lacks_is_refused_in_one_line(tiny_models, tmp_path):
    """SFTConfig's fields pass through to a run; ORPOConfig has no activation_offloading: one line, the run failed."""
    from engine.rundir import read_status

    data, out = write_pairs(tmp_path / "data", count=4), tmp_path / "orpo"
    code, output = typed(*dpo_args(data, out, "--pref_loss", "orpo", "--max_steps", "1", "--activation_offloading",
                                   "true"))
    assert code != 0 and "activation_offloading: not a setting of TRL's ORPOConfig" in output
    assert "Traceback" not in output and read_status(out).state == "failed"
