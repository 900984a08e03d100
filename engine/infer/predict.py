"""``tuner predict``: generate for each sample's prompt, keep every answer as it comes, then score them.

``generated_predictions.jsonl`` grows a line per sample (prompt, predict, label) while the run goes on, so a long
predict can be watched and is not lost when interrupted; ``trainer_log.jsonl`` gets LLaMA-Factory's progress lines.
``predict_results.json`` holds LLaMA-Factory's metric names: BLEU-4 from sacrebleu (its 13a tokenizer, exponential
smoothing, per sentence) and ROUGE-1/2/L F1 from Google's rouge-score (lower-cased, split on non-alphanumerics), each
averaged over samples and scaled to 0-100.

A reward model (a stage rm run's) generates nothing: its predict scores ranking pairs instead, a line per pair with
the score of each reply (LLaMA-Factory's ``chosen`` and ``rejected``), and reports how often the chosen reply scores
higher (``predict_accuracy``, as a fraction, as LLaMA-Factory's) with the mean margin and the pairs' loss.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import closing
from datetime import datetime
from pathlib import Path

from engine.config.schema import TunerConfig
from engine.errors import UserError
from engine.rundir.layout import TRAINER_LOG

log = logging.getLogger("tuner")

PREDICTIONS = "generated_predictions.jsonl"
RESULTS = "predict_results.json"


def split_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to its last user turn, and the reply it was answered with (the label)."""
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, ""


def score(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Per-sample BLEU-4 and ROUGE-1/2/L F1, averaged, on a 0-100 scale."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True, smooth_method="exp")
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    totals = {"predict_bleu-4": 0.0, "predict_rouge-1": 0.0, "predict_rouge-2": 0.0, "predict_rouge-l": 0.0}
    for prediction, label in zip(predictions, labels):
        if prediction.strip() and label.strip():
            totals["predict_bleu-4"] += bleu.sentence_score(prediction, [label]).score
            scores = rouge.score(label, prediction)
            totals["predict_rouge-1"] += 100 * scores["rouge1"].fmeasure
            totals["predict_rouge-2"] += 100 * scores["rouge2"].fmeasure
            totals["predict_rouge-l"] += 100 * scores["rougeL"].fmeasure
    count = max(len(predictions), 1)
    return {name: round(total / count, 4) for name, total in totals.items()}


def prediction_dir(cfg: TunerConfig) -> Path:
    """Where predictions go; existing predictions are kept unless overwrite_output_dir."""
    name = Path((cfg.model.adapter_name_or_path or cfg.model.model_name_or_path).split(",")[-1].rstrip("/")).name
    path = Path(cfg.train.output_dir) if cfg.train.output_dir else \
        Path("saves") / name / "predict" / datetime.now().strftime("%Y%m%d-%H%M%S")
    if (path / PREDICTIONS).exists() and not cfg.train.overwrite_output_dir:
        raise UserError(f"{path / PREDICTIONS} already exists",
                        "choose another output_dir, or set overwrite_output_dir true to replace it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def predict(cfg: TunerConfig, progress: Callable[[int, int], None] | None = None) -> tuple[Path, dict]:
    """Load model + adapter, generate for every sample in batches, write predictions and metrics; returns the
    output directory and the results. ``progress(done, total)`` is called once the model is loaded (done 0) and after
    each batch."""
    from engine.data.loaders import load_conversations
    from engine.infer.inference import generate, generation_kwargs, load_for_inference, prompt_text

    if reward_run(cfg):
        return score_pairs(cfg, progress)
    out = prediction_dir(cfg)
    d = cfg.data
    dataset = d.eval_dataset or d.dataset
    samples = load_conversations(dataset, d.dataset_dir, max_samples=d.max_samples, seed=cfg.train.seed).train
    inference = load_for_inference(cfg)
    kwargs = generation_kwargs(cfg, inference)

    def answer(batch: list[dict]) -> list[tuple[dict, tuple[str, str]]]:
        asked = [split_prompt(sample["messages"]) for sample in batch]
        replies = generate(inference, [prompt for prompt, _ in asked], kwargs)
        return [({"prompt": prompt_text(inference, prompt), "predict": reply, "label": label}, (reply, label))
                for (prompt, label), reply in zip(asked, replies)]

    answered, runtime = _in_batches(cfg, out, samples, answer, progress)
    predictions, labels = [reply for reply, _ in answered], [label for _, label in answered]
    results = {**score(predictions, labels), **_speed(len(answered), runtime), "template": inference.template}
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return out, results


def _in_batches(cfg: TunerConfig, out: Path, items: list, work: Callable[[list], list[tuple[dict, object]]],
                progress: Callable[[int, int], None] | None) -> tuple[list, float]:
    """``work`` on ``items`` in batches of per_device_eval_batch_size: each of its (line, value) pairs written to
    generated_predictions.jsonl as the batch ends, trainer_log.jsonl stepped, ``progress`` told (once before the
    first batch too). Returns the values and the seconds it took."""
    batch_size = cfg.train.per_device_eval_batch_size
    values = []
    started = time.time()
    if progress is not None:
        progress(0, len(items))
    with open(out / PREDICTIONS, "w", encoding="utf-8") as file, \
            closing(_trainer_log(cfg, out, math.ceil(len(items) / batch_size))) as trainer_log:
        for step, start in enumerate(range(0, len(items), batch_size), start=1):
            for line, value in work(items[start:start + batch_size]):
                file.write(json.dumps(line, ensure_ascii=False) + "\n")
                values.append(value)
            file.flush()
            trainer_log.prediction_step(step)
            if progress is not None:
                progress(len(values), len(items))
    return values, time.time() - started


def _speed(count: int, runtime: float) -> dict:
    return {"predict_samples": count, "predict_runtime": round(runtime, 4),
            "predict_samples_per_second": round(count / max(runtime, 1e-9), 3)}


def reward_run(cfg: TunerConfig) -> bool:
    """Whether the model to predict with is a reward model (a stage rm run's, or one exported from it)."""
    from engine.models.loading import is_reward_model
    from engine.models.resolve import resolve_configured

    return is_reward_model(resolve_configured(cfg.model).path, cfg.model.adapter_name_or_path, cfg.model)


def score_pairs(cfg: TunerConfig, progress: Callable[[int, int], None] | None = None) -> tuple[Path, dict]:
    """A reward model's predict: every ranking pair of the dataset tokenized as stage rm trained on it (template,
    cutoff_len), both conversations scored, a line per pair written as it is scored; returns the output directory
    and the results."""
    import torch

    from engine.data.loaders import load_conversations
    from engine.data.pairs import encode_pairs, raise_empty
    from engine.infer.inference import load_for_inference

    out = prediction_dir(cfg)
    d = cfg.data
    pairs = load_conversations(d.eval_dataset or d.dataset, d.dataset_dir, max_samples=d.max_samples,
                               seed=cfg.train.seed, kind="pairs").train
    inference = load_for_inference(cfg, scoring=True)
    tokenizer = inference.tokenizer
    rows, dropped, _, _ = encode_pairs(pairs, tokenizer, inference.template, d.cutoff_len, d.default_system)
    if not rows:
        raise_empty(dropped, d.cutoff_len)
    for reason, count in dropped.items():
        log.warning("predict: %d pairs dropped with %s", count, reason)

    def judge(batch: list[dict]) -> list[tuple[dict, float]]:
        ids = [row["prompt_ids"] + row["chosen_ids"] for row in batch] + \
              [row["prompt_ids"] + row["rejected_ids"] for row in batch]
        padded = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(inference.model.device)
        with torch.inference_mode():
            values = inference.model(**padded).logits[:, 0].float().cpu().tolist()
        return [({"prompt": tokenizer.decode(row["prompt_ids"]), "chosen": round(good, 4), "rejected": round(bad, 4)},
                 good - bad) for row, good, bad in zip(batch, values[:len(batch)], values[len(batch):])]

    margins, runtime = _in_batches(cfg, out, rows, judge, progress)
    results = {"predict_accuracy": round(sum(m > 0 for m in margins) / len(margins), 4),
               "predict_margin": round(sum(margins) / len(margins), 4),
               "predict_loss": round(sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins)
                                     / len(margins), 4),
               **_speed(len(margins), runtime), "template": inference.template}
    (out / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return out, results


def _trainer_log(cfg: TunerConfig, out: Path, batches: int):
    """LLaMA-Factory's trainer_log.jsonl for a predict of ``batches`` batches, timed from now; as there, a log
    already in ``out`` is appended to, or removed first with overwrite_output_dir."""
    from engine.train.callbacks import TrainerLog

    path = out / TRAINER_LOG
    if cfg.train.overwrite_output_dir:
        path.unlink(missing_ok=True)
    trainer_log = TrainerLog(path)
    trainer_log.start(total_steps=batches)
    return trainer_log


def summary_lines(out: Path, results: dict) -> list[str]:
    what = "pairs scored" if "predict_accuracy" in results else "predictions"
    return [f"{results['predict_samples']} {what} in {out / PREDICTIONS}", score_line(results)]


def score_line(results: dict) -> str:
    """The scores and speed of predict_results.json on one line: "bleu-4 12.34  rouge-1 ...  runtime 4.20 s  9.52
    samples/s"."""
    scores = [f"{key.removeprefix('predict_')} {value:.2f}" for key, value in results.items()
              if key.startswith("predict_") and key not in ("predict_samples", "predict_runtime",
                                                             "predict_samples_per_second")]
    return "  ".join([*scores, f"runtime {results['predict_runtime']:.2f} s",
                      f"{results['predict_samples_per_second']:.2f} samples/s"])
