"""The start-of-run check of the fast path (engine.train.path_check): the first micro-batch through the chosen path
and the classic one; a fast path broken on purpose (wrong numbers, or an error) is caught and the run goes on with
the classic path, saying so in one line and in its start event."""

from __future__ import annotations

import pytest

from engine.cli import main
from engine.rundir import read_events, read_status

STEPS = ["--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_samples", "32",
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "3",
         "--logging_steps", "1", "--learning_rate", "1e-3", "--save_strategy", "no", "--template", "alpaca"]


def start_of(run_dir):
    return next(e for e in read_events(run_dir) if e["type"] == "start")


def check_of(start: dict) -> dict:
    return next(f for f in start["speed"] if f["feature"] == "fast-path check")


def test_the_fast_path_agrees_with_the_classic_one_and_the_run_keeps_it(tiny_models, tmp_path):
    out = tmp_path / "fast"
    assert main(["train", *STEPS, "--output_dir", str(out), "--check_fast_path", "true"]) == 0
    start = start_of(out)
    check = check_of(start)
    assert check["checked"] and check["passed"] and not check["fell_back"]
    assert check["loss_diff"] < 1e-4 and check["grads_diff"] < 1e-3
    assert start["attention"] == "tuner_varlen"
    assert "fast-path check: padding-free rows + tuner_varlen attention agrees" in (out / "train.log").read_text()


@pytest.mark.parametrize("model, extra", [("tiny-llama", ["--lora_dropout", "0.2"]),
                                          ("tiny-mixtral", [])])
def test_dropout_and_a_router_loss_do_not_fail_a_sound_path(tiny_models, tmp_path, model, extra):
    """Dropout is off during the check (the model stays in train mode, where checkpointing acts), and a mixture of
    experts' router loss (TRL turns Mixtral's on from its config's router_aux_loss_coef), which averages over the
    batch as laid out, is left out of both sides."""
    out = tmp_path / model
    assert main(["train", *STEPS, "--output_dir", str(out), "--model_name_or_path", model, "--max_steps", "1",
                 "--check_fast_path", "true", "--gradient_checkpointing", "true", *extra]) == 0
    check = check_of(start_of(out))
    assert check["checked"] and check["passed"], check


def test_on_a_cpu_the_check_is_left_out_by_default_and_says_why(tiny_models, tmp_path):
    out = tmp_path / "default"
    assert main(["train", *STEPS, "--output_dir", str(out), "--max_steps", "1"]) == 0
    check = check_of(start_of(out))
    assert not check["checked"] and check["why"].startswith("no GPU")
    assert "INFO tuner: fast-path check: not run (no GPU" in (out / "train.log").read_text()


def test_check_fast_path_false_leaves_it_out_even_where_it_would_run(tiny_models, tmp_path, monkeypatch):
    """Where the check would run (here: a GPU, as the plan is told), false leaves it out and says so."""
    from engine.train import path_check

    real = path_check.why_not

    def check_ran(*args):
        raise AssertionError("the check ran")

    monkeypatch.setattr(path_check, "why_not", lambda cfg, plan, on_gpu, *rest: real(cfg, plan, True, *rest))
    monkeypatch.setattr(path_check, "check", check_ran)
    out = tmp_path / "off"
    assert main(["train", *STEPS, "--output_dir", str(out), "--max_steps", "1", "--check_fast_path", "false"]) == 0
    check = check_of(start_of(out))
    assert not check["checked"] and check["why"] == "check_fast_path false"


def test_asked_for_where_it_cannot_run_the_check_says_why_as_a_warning(tiny_models, tmp_path):
    out = tmp_path / "dpo"
    assert main(["train", "--stage", "dpo", "--model_name_or_path", "tiny-llama", "--dataset", "demo_pairs",
                 "--max_samples", "8", "--max_steps", "1", "--save_strategy", "no", "--output_dir", str(out),
                 "--check_fast_path", "true"]) == 0
    assert not check_of(start_of(out))["checked"]
    assert "WARNING tuner: fast-path check: not run (a preference or reward stage" in (out / "train.log").read_text()


@pytest.mark.parametrize("broken", ["wrong", "raises"])
def test_a_broken_fast_path_falls_back_to_the_classic_path(tiny_models, tmp_path, monkeypatch, broken):
    """The per-sample attention this CPU's fast path runs is broken on purpose: its output scaled (a kernel giving
    wrong numbers) or an error (a kernel that cannot run here). The run trains on the classic path and learns what a
    run asked for the classic path learns."""
    from engine.models import attention

    real = attention._per_sample_sdpa

    def wrong(*args, **kwargs):
        out, weights = real(*args, **kwargs)
        return out * 1.5, weights

    def raises(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(attention, "_per_sample_sdpa", wrong if broken == "wrong" else raises)
    out = tmp_path / broken
    assert main(["train", *STEPS, "--output_dir", str(out), "--check_fast_path", "true"]) == 0
    assert read_status(out).state == "completed"
    start = start_of(out)
    check = check_of(start)
    assert check["checked"] and check["fell_back"]
    if broken == "raises":
        assert "no kernel image" in check["error"]
    else:
        assert check["loss_diff"] > 1e-3
    assert start["attention"] == "sdpa" and "failed its check" in start["attention_reason"]
    padding = next(f for f in start["speed"] if f["feature"] == "padding-free batches")
    assert padding["on"] is False
    log = (out / "train.log").read_text()
    assert "going on with the classic path" in log
    monkeypatch.undo()
    classic = tmp_path / "classic"
    assert main(["train", *STEPS, "--output_dir", str(classic), "--padding_free", "false", "--flash_attn", "sdpa"]) == 0
    fell_back = [e["loss"] for e in read_events(out) if e["type"] == "log"]
    asked = [e["loss"] for e in read_events(classic) if e["type"] == "log"]
    assert fell_back == pytest.approx(asked, rel=1e-4)


@pytest.mark.parametrize("lengths, kept", [((10, 10, 10, 50), 3), ((50, 10, 10, 10), 1), ((20, 20), 2)])
def test_the_classic_batch_is_never_larger_than_the_packed_row(lengths, kept):
    """Padded, a packed row's samples could take several times the row's memory (auto-fit sized the row to the GPU):
    the check takes the first samples whose padded batch fits in the row's tokens, the same ones on both sides."""
    from types import SimpleNamespace

    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from engine.memory.autofit import Fit
    from engine.train.path_check import batches

    ids = list(range(4, 4 + sum(lengths)))
    row = {"input_ids": ids, "labels": ids, "seq_lengths": list(lengths)}
    trainer = SimpleNamespace(train_dataset=[row],
                              data_collator=DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    plan = SimpleNamespace(fit=Fit(1, 1, False, tokens=sum(lengths)))
    fast, classic = batches(trainer, plan, pad_token_id=0)
    assert classic["input_ids"].shape == (kept, max(lengths[:kept]))
    assert classic["input_ids"].numel() <= sum(lengths)
    assert fast["input_ids"].shape == (1, sum(lengths[:kept]))
    assert fast["cu_seq_lens_q"].tolist() == [0, *[sum(lengths[:i + 1]) for i in range(kept)]]
    for sample, (start, length) in enumerate(zip([0, *list(sum(lengths[:i + 1]) for i in range(kept))], lengths[:kept])):
        assert classic["input_ids"][sample, :length].tolist() == ids[start:start + length]
        assert classic["attention_mask"][sample].sum() == length


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-mixtral"])
def test_trls_own_loss_on_packed_rows_passes_the_check(tiny_models, tmp_path, model):
    """The GPU's default without Liger: TRL's SFTTrainer loss over auto-fit's packed rows, checked before train()
    as the runner does. For Mixtral TRL turns the router loss on, whose averaging over accumulated micro-batches reads
    state only train() sets: the check leaves it out of both sides rather than fail a sound path."""
    from engine.config.schema import parse_args
    from engine.data.tokenize import build_datasets
    from engine.memory.autofit import Fit
    from engine.models.kernels import LigerChoice
    from engine.models.loading import Hardware, Precision, apply_method, load_model, load_tokenizer
    from engine.rundir.run import RunDir
    from engine.rundir.status import RunStatus
    from engine.train import path_check
    from engine.train.callbacks import Divergence
    from engine.train.sft import SFT
    from engine.train.speed import SpeedPlan
    from engine.train.stage import TrainerParts
    from engine.train.strategy import World, prepare_strategy

    cfg = parse_args([*STEPS, "--model_name_or_path", model, "--output_dir", str(tmp_path / "run")])
    path = str(tiny_models[model])
    tokenizer = load_tokenizer(path, cfg)
    data = build_datasets(cfg, tokenizer)
    plan = SpeedPlan(True, "test", "tuner_varlen", "test", LigerChoice(False, "test"),
                     Fit(1, 2, False, tokens=3 * data.lengths.longest, reason="test"), True, data.lengths.longest,
                     "trl", "test")
    fp32 = Precision("fp32", "test")
    model_ = apply_method(load_model(path, cfg, fp32, "tuner_varlen"), cfg, False)
    run = RunDir(tmp_path / "run", None, RunStatus(id="t", name="run"))
    run.path.mkdir()
    trainer = SFT.trainer(TrainerParts(cfg, model_, tokenizer, data, fp32, Hardware(False, False, False, "cpu"), run,
                                       [], Divergence(), prepare_strategy(cfg, run.path, path, "fp32", World(1))),
                          plan)
    assert trainer.aux_loss_enabled is (model == "tiny-mixtral")
    result = path_check.check(trainer, model_, plan, "fp32", tokenizer.pad_token_id)
    assert result.checked and result.passed, result.line()
    assert trainer.aux_loss_enabled is (model == "tiny-mixtral")  # put back for training
    assert all(p.grad is None for p in model_.parameters())  # the first step starts clean
