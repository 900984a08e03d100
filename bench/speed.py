"""`tuner train` with its defaults against the plain TRL + PEFT recipe, on the same card and the same token sequences.

The plain recipe is what TRL's SFTTrainer and PEFT do with the classic settings: each batch padded to its longest
sample, gradient checkpointing on, TRL's own loss, SDPA attention. `tuner train` gets the same user flags (method,
LoRA targets, micro-batch, accumulation, learning rate, epochs) and picks the rest itself (padding-free rows,
attention, Liger, auto-fit). Each runs as its own process, interleaved round by round; both train on the rows the
engine tokenized, so the trained (non-padding) tokens are the same. Printed per configuration: trained tokens/s
(median over rounds), peak GPU memory, MFU and the ratio, and how close the two loss curves are.

    python3 bench/speed.py                                   # CPU: the tiny Llama on 160 alpaca samples, 3 rounds
    python3 bench/speed.py --samples 48 --rounds 1           # the CI-sized form
    python3 bench/speed.py --geometry llama2-7b --out bench/results/speed-h200.jsonl   # a GPU: LoRA, QLoRA, 512

MFU counts the model's FLOPs per trained token: 2N forward and 2N backward through the frozen weights, 2N more for
the weights that train (full fine-tuning: 6N), and causal attention's 6 x layers x hidden x mean length; recomputation
under checkpointing is not counted (it is the cost that MFU exposes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ALPACA = REPO.parent / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}

# (name, flags the user would type, data): the configurations; alpaca = alpaca-like lengths
GPU_CONFIGS = [
    ("lora-alpaca", "--finetuning_type lora --lora_target q_proj,v_proj --per_device_train_batch_size 2 "
                    "--gradient_accumulation_steps 4", "alpaca"),
    ("qlora4-alpaca", "--finetuning_type lora --quantization_bit 4 --lora_target q_proj,v_proj "
                      "--per_device_train_batch_size 2 --gradient_accumulation_steps 4", "alpaca"),
    ("lora-fixed512", "--finetuning_type lora --lora_target q_proj,v_proj --per_device_train_batch_size 2 "
                      "--gradient_accumulation_steps 4 --cutoff_len 512", "fixed512"),
]
CPU_CONFIGS = [GPU_CONFIGS[0][:2] + ("alpaca",)]


# --- data: the same conversations for both -----------------------------------------------------------------------


def single_token_words(tokenizer, count: int = 400) -> list[str]:
    """Words the tokenizer turns into exactly one token after a space, so a text of k words is k tokens."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        word = token[1:] if token.startswith("Ġ") else None
        if word and word.isalpha() and len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1:
            words.append(word)
        if len(words) == count:
            break
    return words


def synthetic_records(tokenizer, samples: int, kind: str, seed: int = 0) -> list[dict]:
    """Alpaca records with alpaca-like token lengths (log-normal, median ~180 tokens, prompt ~40% of it), or every
    sample exactly 512 tokens long once templated (cut there by cutoff_len)."""
    rng = random.Random(seed)
    words = single_token_words(tokenizer)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, n)))

    records = []
    for _ in range(samples):
        total = 600 if kind == "fixed512" else min(1024, max(24, int(rng.lognormvariate(math.log(160), 0.55))))
        prompt = max(8, int(total * 0.4)) if kind != "fixed512" else 200
        records.append({"instruction": text(prompt), "input": "", "output": text(total - prompt)})
    return records


def write_data(work: Path, tokenizer, samples: int, kind: str, real_alpaca: bool) -> Path:
    """LLaMA-Factory's alpaca demo records (on the demo model), else synthetic ones of controlled lengths."""
    path = work / f"data-{kind}-{samples}.json"
    if real_alpaca:
        records = json.loads(ALPACA.read_text())[:samples]
    else:
        records = synthetic_records(tokenizer, samples, kind)
    path.write_text(json.dumps(records))
    return path


# --- the two contenders, each a process ----------------------------------------------------------------------------


def common_flags(model: Path, data: Path, epochs: float) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset", str(data), "--template", "alpaca",
            "--num_train_epochs", str(epochs), "--learning_rate", "1e-4", "--logging_steps", "1",
            "--save_strategy", "no", "--seed", "42"]


def run_tuner(model: Path, data: Path, flags: str, epochs: float, out: Path) -> dict:
    cmd = [sys.executable, "-m", "engine.cli", "train", *common_flags(model, data, epochs), *flags.split(),
           "--output_dir", str(out), "--overwrite_output_dir", "true"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    from engine.rundir.events import read_events

    events = read_events(out)
    end = next((e for e in reversed(events) if e["type"] == "end"), {})
    if proc.returncode != 0 or "runtime_s" not in end:
        raise SystemExit(f"tuner train failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    start = next(e for e in events if e["type"] == "start")
    memory = next((e for e in reversed(events) if e["type"] == "memory"), {})
    return {"runtime_s": end["runtime_s"], "losses": [e["loss"] for e in events if e["type"] == "log"],
            "peak_allocated_gib": memory.get("max_allocated_gib"), "speed": start.get("speed"),
            "batch": start.get("batch"), "trainable_params": start.get("trainable_params"),
            "total_params": start.get("total_params"), "device": start.get("device"),
            "versions": start.get("versions")}


def run_plain(rows: Path, model: Path, flags: str, epochs: float, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(rows), "--model", str(model),
           "--flags", flags, "--epochs", str(epochs), "--work", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the plain recipe failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plain_recipe(rows_path: Path, model_path: Path, flags: str, epochs: float, work: Path) -> dict:
    """In this process: TRL's SFTTrainer + PEFT as a tutorial writes them, on the rows the engine tokenized."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    from engine.config.schema import parse_args

    cfg = parse_args(flags.split())
    t, f = cfg.train, cfg.finetune
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if gpu else torch.float32
    quantization = None
    if cfg.model.quantization_bit == 4:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype)
    set_seed(42)  # as the engine does before loading: the same LoRA initialisation, comparable loss curves
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa",
                                                 quantization_config=quantization,
                                                 device_map={"": 0} if gpu and quantization else None)
    if quantization:
        model = prepare_model_for_kbit_training(model)
    targets = f.lora_target.split(",") if f.lora_target != "all" else "all-linear"
    model = get_peft_model(model, LoraConfig(r=f.lora_rank, lora_alpha=f.lora_alpha or 2 * f.lora_rank,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows = json.loads(rows_path.read_text())
    args = SFTConfig(output_dir=str(work), per_device_train_batch_size=t.per_device_train_batch_size,
                     gradient_accumulation_steps=t.gradient_accumulation_steps, num_train_epochs=epochs,
                     learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], seed=42,
                     gradient_checkpointing=True, bf16=gpu, use_cpu=not gpu, max_length=cfg.data.cutoff_len,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    trainer.train()
    runtime = time.time() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peak = torch.cuda.max_memory_allocated() / 1024**3 if gpu else None
    return {"runtime_s": round(runtime, 2), "losses": losses, "peak_allocated_gib": peak and round(peak, 3)}


def engine_rows(model: Path, data: Path, flags: str, out: Path) -> tuple[Path, list[int]]:
    """The rows `tuner train` trains on (its template, truncation and drops), for the plain recipe."""
    from engine.config.schema import parse_args
    from engine.data.tokenize import build_datasets
    from engine.models.loading import load_tokenizer

    cfg = parse_args(common_flags(model, data, 1) + flags.split())
    dataset = build_datasets(cfg, load_tokenizer(str(model), cfg)).train
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in dataset]
    out.write_text(json.dumps(rows))
    return out, [len(r["input_ids"]) for r in rows]


# --- figures ---------------------------------------------------------------------------------------------------


def flops_per_token(total_params: int, trainable_params: int, full: bool, geometry, mean_len: float) -> float:
    attention = 6 * geometry.num_hidden_layers * geometry.hidden_size * mean_len
    return (6 * total_params if full else 4 * total_params + 2 * trainable_params) + attention


def peak_flops(device: str | None) -> float | None:
    for name, flops in PEAK_BF16_FLOPS.items():
        if device and name in device:
            return flops
    return None


def loss_agreement(ours: list[float], plain: list[float]) -> dict:
    """How close the curves are: the mean loss over the last quarter of each, and its relative difference."""
    def tail(losses):
        return statistics.fmean(losses[-max(1, len(losses) // 4):])

    a, b = tail(ours), tail(plain)
    return {"ours_final_quarter": round(a, 4), "plain_final_quarter": round(b, 4),
            "relative_difference": round(abs(a - b) / abs(b), 4), "steps": [len(ours), len(plain)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default=None, help="a catalog geometry to build with random weights "
                        "(llama2-7b on a GPU); default: the tiny-llama demo model")
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--only", nargs="*", help="configuration names to run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuner-speed"))
    parser.add_argument("--out", type=Path, help="append one JSON line per configuration here")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--flags", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if args.plain:
        print(json.dumps(plain_recipe(args.plain, args.model, args.flags, args.epochs, args.work)))
        return 0

    import torch

    from engine.models.catalog import lookup
    from engine.models.demo import demo_model_path
    from transformers import AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    if args.geometry:
        from bench.gpu_memory import build_model

        model = args.work / args.geometry
        if not (model / "config.json").exists():
            build_model(args.geometry, model)
        geometry = lookup(args.geometry).geometry
    else:
        model, geometry = demo_model_path("tiny-llama"), lookup("tiny-llama").geometry
    tokenizer = AutoTokenizer.from_pretrained(model)
    configs = GPU_CONFIGS if gpu or args.only else CPU_CONFIGS  # --only: any of them, a GPU's on a CPU too
    for name, flags, kind in configs:
        if args.only and name not in args.only:
            continue
        real_alpaca = kind == "alpaca" and not args.geometry and ALPACA.is_file()
        data = write_data(args.work, tokenizer, args.samples, kind, real_alpaca)
        rows, lengths = engine_rows(model, data, flags, args.work / f"rows-{name}.json")
        tokens = sum(lengths) * args.epochs
        ours_runs, plain_runs = [], []
        for _ in range(args.rounds):  # interleaved, so a slow moment of the machine hits both alike
            plain_runs.append(run_plain(rows, model, flags, args.epochs, args.work / "plain"))
            ours_runs.append(run_tuner(model, data, flags, args.epochs, args.work / "ours"))
        ours_s = statistics.median(r["runtime_s"] for r in ours_runs)
        plain_s = statistics.median(r["runtime_s"] for r in plain_runs)
        last = ours_runs[-1]
        full = "--finetuning_type full" in flags
        per_token = flops_per_token(last["total_params"], last["trainable_params"], full, geometry,
                                    sum(lengths) / len(lengths))
        peak = peak_flops(last["device"])
        result = {
            "config": name, "flags": flags, "data": "alpaca_en_demo" if real_alpaca else kind,
            "samples": len(lengths), "trained_tokens": int(tokens), "rounds": args.rounds,
            "plain_tokens_per_s": round(tokens / plain_s, 1), "tuner_tokens_per_s": round(tokens / ours_s, 1),
            "ratio": round(plain_s / ours_s, 2),
            "plain_runtimes_s": [r["runtime_s"] for r in plain_runs],
            "tuner_runtimes_s": [r["runtime_s"] for r in ours_runs],
            "plain_peak_allocated_gib": plain_runs[-1]["peak_allocated_gib"],
            "tuner_peak_allocated_gib": last["peak_allocated_gib"],
            "tuner_mfu": round(tokens / ours_s * per_token / peak, 3) if peak else None,
            "plain_mfu": round(tokens / plain_s * per_token / peak, 3) if peak else None,
            "loss": loss_agreement(last["losses"], plain_runs[-1]["losses"]),
            "tuner_speed": last["speed"], "tuner_batch": last["batch"], "device": last["device"],
            "versions": last["versions"], "date": date.today().isoformat(),
            "command": "python3 bench/speed.py " + " ".join(sys.argv[1:]),
        }
        print(f"{name}: plain {result['plain_tokens_per_s']:.0f} tokens/s, tuner {result['tuner_tokens_per_s']:.0f} "
              f"tokens/s, ratio {result['ratio']:.2f}x; peak GiB {result['plain_peak_allocated_gib']} vs "
              f"{result['tuner_peak_allocated_gib']}; MFU {result['plain_mfu']} vs {result['tuner_mfu']}; "
              f"final-quarter loss {result['loss']['plain_final_quarter']} vs {result['loss']['ours_final_quarter']} "
              f"({result['loss']['relative_difference']:.1%} apart)", flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
        shutil.rmtree(args.work / "ours", ignore_errors=True)
        shutil.rmtree(args.work / "plain", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
