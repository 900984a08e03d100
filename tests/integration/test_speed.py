"""The fast defaults end to end on the tiny models: padding-free rows learn what padded batches learn, packed rows keep
their samples and labels, data is prepared once, and an out-of-memory first step backs off and goes on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from engine.cli import main
from engine.config.schema import parse_args
from engine.data.tokenize import build_datasets, encode_conversations
from engine.models.loading import load_tokenizer
from engine.rundir import read_events, read_status

STEPS = ["--model_name_or_path", "tiny-llama", "--dataset", "demo_alpaca", "--max_samples", "48",
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", "6",
         "--logging_steps", "1", "--learning_rate", "1e-3", "--save_strategy", "no", "--template", "alpaca"]


def losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["type"] == "log"]


def test_padding_free_rows_learn_what_padded_batches_learn(tiny_models, tmp_path):
    """The defaults (one padding-free row per micro-batch, per-sample attention, no checkpointing) against the classic
    path (padded batches, SDPA with a padding mask, checkpointing): the same samples in the same order give the same
    loss at every step."""
    assert main(["train", *STEPS, "--output_dir", str(tmp_path / "fast")]) == 0
    assert main(["train", *STEPS, "--output_dir", str(tmp_path / "classic"), "--padding_free", "false",
                 "--flash_attn", "sdpa", "--gradient_checkpointing", "true", "--auto_fit", "false"]) == 0
    fast, classic = losses(tmp_path / "fast"), losses(tmp_path / "classic")
    assert len(fast) == len(classic) == 6 and fast[-1] < fast[0]
    assert fast == pytest.approx(classic, rel=1e-4)
    start = next(e for e in read_events(tmp_path / "fast") if e["type"] == "start")
    assert start["attention"] == "tuner_varlen" and start["batch"]["gradient_checkpointing"] is False
    classic_start = next(e for e in read_events(tmp_path / "classic") if e["type"] == "start")
    assert classic_start["batch"]["gradient_checkpointing"] is True and classic_start["attention"] == "sdpa"


def test_packed_rows_keep_every_sample_and_its_labels(tiny_models, tmp_path):
    """Auto-fit's GPU layout (rows of up to T tokens, TRL's best-fit-decreasing packing) run on this CPU: every row
    is whole samples with their own labels, each sample starting at position 0, and it trains."""
    from engine.memory.autofit import Fit
    from engine.models.loading import Hardware, Precision, apply_method, load_model
    from engine.rundir.run import RunDir
    from engine.rundir.status import RunStatus
    from engine.train.callbacks import Divergence
    from engine.train.sft import SFT
    from engine.train.stage import TrainerParts
    from engine.train.speed import SpeedPlan
    from engine.train.strategy import World, prepare_strategy

    cfg = parse_args([*STEPS, "--output_dir", str(tmp_path / "packed"), "--max_steps", "2", "--val_size", "6"])
    tokenizer = load_tokenizer(str(tiny_models["tiny-llama"]), cfg)
    data = build_datasets(cfg, tokenizer)
    rows = {tuple(r["input_ids"]): r["labels"] for r in data.train}
    tokens = 3 * data.lengths.longest
    plan = SpeedPlan(True, "test", "tuner_varlen", "test", _off(), Fit(1, 2, False, tokens=tokens, reason="test"),
                     True, data.lengths.longest, "model", "test")
    model = apply_method(load_model(str(tiny_models["tiny-llama"]), cfg, Precision("fp32", "test"), "tuner_varlen"),
                         cfg, False)
    run = RunDir(tmp_path / "packed", None, RunStatus(id="t", name="packed"))
    run.path.mkdir()
    trainer = SFT.trainer(TrainerParts(cfg, model, tokenizer, data, Precision("fp32", "test"),
                                       Hardware(False, False, False, "cpu"), run, [], Divergence(),
                                       prepare_strategy(cfg, run.path, str(tiny_models["tiny-llama"]), "fp32",
                                                        World(1))), plan)
    seen = 0
    for batch in trainer.get_train_dataloader():
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= tokens
        bounds = batch["cu_seq_lens_q"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            ids = tuple(batch["input_ids"][0, start:end].tolist())
            assert ids in rows and batch["position_ids"][0, start] == 0
            assert batch["labels"][0, start + 1:end].tolist() == rows[ids][1:]
            seen += 1
    assert seen == len(data.train)
    assert trainer.eval_dataset.to_list() == data.eval.to_list(), "evaluation data is neither packed nor cut again"
    assert trainer.train().global_step == 2


def _off():
    from engine.models.kernels import LigerChoice

    return LigerChoice(False, "test")


def _unique_data(tmp_path: Path, tag: str, count: int = 40) -> Path:
    """A dataset no earlier test run has seen (the tokenized cache outlives the run)."""
    path = tmp_path / f"{tag}.json"
    tag = f"{tag} {uuid.uuid4().hex[:8]}"
    path.write_text(json.dumps([{"instruction": f"Say {tag} number {i}.", "input": "", "output": f"{tag} {i}!"}
                                for i in range(count)]))
    return path


def test_data_is_prepared_once_and_loaded_from_the_cache_after(tiny_models, tmp_path):
    data = _unique_data(tmp_path, "cache")
    cfg = parse_args(["--model_name_or_path", "tiny-llama", "--dataset", str(data), "--template", "alpaca"])
    tokenizer = load_tokenizer(str(tiny_models["tiny-llama"]), cfg)
    first = build_datasets(cfg, tokenizer)
    second = build_datasets(cfg, tokenizer)
    assert not first.from_cache and second.from_cache
    assert second.train["input_ids"] == first.train["input_ids"] and second.report == first.report
    assert second.lengths == first.lengths
    cfg.data.overwrite_cache = True
    assert not build_datasets(cfg, tokenizer).from_cache
    cfg.data.overwrite_cache, cfg.data.cutoff_len = False, first.lengths.longest - 1  # another cutoff: another entry
    assert not build_datasets(cfg, tokenizer).from_cache
    data.write_text(data.read_text().replace("number 3.", "number three."))  # so is an edited dataset
    cfg.data.cutoff_len = 1024
    assert not build_datasets(cfg, tokenizer).from_cache


def test_parallel_workers_and_the_batch_encoder_give_the_rows_of_one_process(tiny_models, tmp_path):
    from engine.data.loaders import load_conversations

    data = _unique_data(tmp_path, "workers", count=60)
    rows = {}
    for workers in ("1", "2"):
        cfg = parse_args(["--model_name_or_path", "tiny-llama", "--dataset", str(data), "--template", "llama2",
                          "--preprocessing_num_workers", workers, "--overwrite_cache", "true", "--cutoff_len", "24"])
        tokenizer = load_tokenizer(str(tiny_models["tiny-llama"]), cfg)
        rows[workers] = build_datasets(cfg, tokenizer).train.to_list()
    one_by_one = encode_conversations(load_conversations(str(data), None).train, tokenizer, "llama2", 24).rows
    assert rows["1"] == rows["2"] == one_by_one


def test_tokenized_path_saves_and_stops_then_trains_from_it(tiny_models, tmp_path):
    saved = tmp_path / "tokenized"
    args = [*STEPS, "--tokenized_path", str(saved)]
    assert main(["train", *args, "--output_dir", str(tmp_path / "prepare")]) == 0
    assert (saved / "meta.json").is_file() and not (tmp_path / "prepare" / "adapter_model.safetensors").exists()
    assert read_status(tmp_path / "prepare").state == "completed"
    assert f"tokenized_path {saved}" in (tmp_path / "prepare" / "train.log").read_text()
    assert main(["train", *args, "--output_dir", str(tmp_path / "train")]) == 0
    assert (tmp_path / "train" / "adapter_model.safetensors").is_file() and len(losses(tmp_path / "train")) == 6


def test_a_tokenized_path_that_is_a_file_is_refused_in_one_line(tiny_models, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", *STEPS, "--tokenized_path", str(tmp_path / "file"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "tokenized_path" in read_status(tmp_path / "o").error and "is a file" in read_status(tmp_path / "o").error


def test_an_out_of_memory_first_step_backs_off_and_the_run_goes_on(tiny_models, tmp_path, monkeypatch):
    """GPU memory is what this machine lacks: the model is given a memory limit (more tokens in one forward than
    fit raise torch.OutOfMemoryError, as CUDA would). The run halves its micro-batch and completes."""
    import engine.models.loading as loading

    real_load = loading.load_model
    limit = 2  # samples in one padding-free row: the asked micro-batch of 4 does not fit, 2 do

    def load_with_a_memory_limit(*args, **kwargs):
        model = real_load(*args, **kwargs)
        forward = model.forward

        def limited(*f_args, **f_kwargs):
            positions = f_kwargs.get("position_ids")
            if positions is not None and int((positions == 0).sum()) > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (the test's limit)")
            return forward(*f_args, **f_kwargs)

        model.forward = limited
        return model

    monkeypatch.setattr(loading, "load_model", load_with_a_memory_limit)
    out = tmp_path / "backoff"
    assert main(["train", *STEPS, "--output_dir", str(out)]) == 0
    starts = [e for e in read_events(out) if e["type"] == "start"]
    assert len(starts) >= 2 and starts[-1]["backed_off"] is True
    assert starts[0]["batch"]["per_device_train_batch_size"] == 4
    last = starts[-1]["batch"]
    assert last["per_device_train_batch_size"] * last["gradient_accumulation_steps"] == 8  # samples per step kept
    assert read_status(out).state == "completed" and len(losses(out)) == 6
    assert "out of GPU memory in the first step" in (out / "train.log").read_text()
    monkeypatch.setattr(loading, "load_model", load_with_a_memory_limit)
    assert main(["train", *STEPS, "--output_dir", str(tmp_path / "kept"), "--auto_fit", "false"]) == 2
    assert "out of GPU memory" in read_status(tmp_path / "kept").error


def test_after_a_back_off_the_recorded_peak_is_the_smaller_layouts_not_the_failed_attempts(tiny_models, tmp_path,
                                                                                           monkeypatch):
    """The run's memory event reports the peak since the back-off. This machine has no GPU: CUDA's peak statistics
    are stood in for by a counter (the failed attempt peaks at 70 GiB, the smaller layout at 9 GiB); the back-off and
    the reading are the engine's own."""
    import engine.models.loading as loading
    import engine.train.callbacks as callbacks

    gib = 1024**3
    memory = {"peak": 0}

    def reached(gibs: float) -> None:
        memory["peak"] = max(memory["peak"], int(gibs * gib))

    monkeypatch.setattr(callbacks, "_on_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: memory["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: memory["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: memory.update(peak=0))
    real_load = loading.load_model

    def load_with_a_memory_limit(*args, **kwargs):
        model = real_load(*args, **kwargs)
        forward = model.forward

        def limited(*f_args, **f_kwargs):
            positions = f_kwargs.get("position_ids")
            if positions is not None and int((positions == 0).sum()) > 2:
                reached(70)
                raise torch.OutOfMemoryError("CUDA out of memory (the test's limit)")
            reached(9)
            return forward(*f_args, **f_kwargs)

        model.forward = limited
        return model

    monkeypatch.setattr(loading, "load_model", load_with_a_memory_limit)
    out = tmp_path / "backoff"
    assert main(["train", *STEPS, "--output_dir", str(out), "--max_steps", "2"]) == 0
    assert [e for e in read_events(out) if e["type"] == "start"][-1]["backed_off"] is True
    (recorded,) = [e for e in read_events(out) if e["type"] == "memory"]
    assert recorded["max_allocated_gib"] == 9.0


def test_overwrite_cache_on_the_command_line_prepares_again_in_the_foreground_and_detached(tiny_models, tmp_path):
    """A one-shot key: it acts for the start it is given to (config.yaml never keeps it, so a resume reuses the
    cache)."""
    from job_helpers import tuner as tuner_cli
    from job_helpers import wait_for

    data = _unique_data(tmp_path, "overwrite")
    args = ["train", "--model_name_or_path", "tiny-llama", "--dataset", str(data), "--template", "alpaca",
            "--max_steps", "1", "--save_strategy", "no"]

    def prepared(run_dir: Path) -> bool:
        return "tokenized data prepared" in (run_dir / "train.log").read_text()

    assert main([*args, "--output_dir", str(tmp_path / "first")]) == 0 and prepared(tmp_path / "first")
    assert main([*args, "--output_dir", str(tmp_path / "cached")]) == 0 and not prepared(tmp_path / "cached")
    assert main([*args, "--output_dir", str(tmp_path / "again"), "--overwrite_cache", "true"]) == 0
    assert prepared(tmp_path / "again")
    result = tuner_cli(*args, "--output_dir", str(tmp_path / "detached"), "--overwrite_cache", "true", "--detach",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: read_status(tmp_path / "detached").state in ("completed", "failed"), 120, "the detached run")
    assert read_status(tmp_path / "detached").state == "completed" and prepared(tmp_path / "detached")
    assert "overwrite_cache: false" in (tmp_path / "detached" / "config.yaml").read_text()


def test_a_second_process_preparing_the_same_data_says_it_waits_and_goes_on_when_the_first_is_done(tmp_path):
    """The cache entry's lock: flock between two open files, as between two processes."""
    import logging
    import threading

    from engine.data.tokenize import _locked
    from job_helpers import wait_for

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("tuner")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    entered = threading.Event()

    def wait_then_enter():
        with _locked(tmp_path / "entry.lock"):
            entered.set()

    try:
        with _locked(tmp_path / "entry.lock"):
            second = threading.Thread(target=wait_then_enter)
            second.start()
            wait_for(lambda: any("another process is preparing the same data" in line for line in lines), 10,
                     "the second to say it waits")
            assert not entered.is_set(), "the second waits while the first holds the entry"
        second.join(10)
        assert entered.is_set()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
