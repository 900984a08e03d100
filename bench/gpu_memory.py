"""Measure the engine's own peak GPU memory and throughput per method on a real model geometry (Llama-2-7B by default).

The weights are random (memory and speed do not depend on their values), built on the GPU and saved like a user's
model; every configuration then runs `tuner train` unchanged as its own process, and the run's events give the peak
memory (torch's max allocated / reserved, NVML's used) and tokens/s. One JSON line per configuration goes to --out,
written as each finishes, so a run cut short keeps what it measured. These lines are the calibration data for the
VRAM estimator.

    python3 bench/gpu_memory.py --out results.jsonl                  # on a GPU machine
    python3 bench/gpu_memory.py --geometry tiny-llama --steps 2 --out /tmp/r.jsonl   # a dry run on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (name, flags): the methods of the seed VRAM table at a few batch sizes and sequence lengths, most useful first.
CONFIGS = [
    ("lora-b1-s512", "--finetuning_type lora --per_device_train_batch_size 1 --cutoff_len 512"),
    ("qlora4-b1-s512", "--finetuning_type lora --quantization_bit 4 --per_device_train_batch_size 1 --cutoff_len 512"),
    ("qlora8-b1-s512", "--finetuning_type lora --quantization_bit 8 --per_device_train_batch_size 1 --cutoff_len 512"),
    ("freeze-b1-s512", "--finetuning_type freeze --per_device_train_batch_size 1 --cutoff_len 512"),
    ("lora-b4-s1024", "--finetuning_type lora --per_device_train_batch_size 4 --cutoff_len 1024"),
    ("lora-b4-s1024-nogc", "--finetuning_type lora --per_device_train_batch_size 4 --cutoff_len 1024 "
                           "--gradient_checkpointing false"),
    ("qlora4-b4-s2048", "--finetuning_type lora --quantization_bit 4 --per_device_train_batch_size 4 --cutoff_len 2048"),
    ("lora-b8-s2048", "--finetuning_type lora --per_device_train_batch_size 8 --cutoff_len 2048"),
    ("full-b1-s256", "--finetuning_type full --per_device_train_batch_size 1 --cutoff_len 256"),
]


# The path the estimator's constants were measured on (padded batches, SDPA, TRL's loss, checkpointing unless a
# config turns it off): auto-fit and the speed defaults would change the batch under the measurement.
CLASSIC = ["--auto_fit", "false", "--padding_free", "false", "--flash_attn", "sdpa", "--enable_liger_kernel", "false",
           "--gradient_checkpointing", "true"]


def build_model(geometry_name: str, model_dir: Path) -> None:
    """A randomly initialised model of the catalog geometry, saved as safetensors with the demo tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.models.catalog import lookup
    from engine.models.demo import demo_model_path

    g = lookup(geometry_name).geometry
    config = LlamaConfig(
        hidden_size=g.hidden_size, intermediate_size=g.intermediate_size, num_hidden_layers=g.num_hidden_layers,
        num_attention_heads=g.num_attention_heads, num_key_value_heads=g.num_key_value_heads,
        vocab_size=g.vocab_size, max_position_embeddings=g.max_position_embeddings or 4096,
        tie_word_embeddings=g.tie_word_embeddings, dtype="bfloat16",
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(model_dir)
    tokenizer_dir = demo_model_path("tiny-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, model_dir / name)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def write_long_samples(path: Path, count: int = 96) -> None:
    """Alpaca records long enough that every sample is cut at cutoff_len, so each batch has exactly that length."""
    rng = random.Random(0)
    words = "the model learns to answer short questions about words numbers and places in one line".split()
    records = [{"instruction": "Repeat the text.", "input": "",
                "output": " ".join(rng.choice(words) for _ in range(4000))} for _ in range(count)]
    path.write_text(json.dumps(records))


def measure(name: str, flags: str, model_dir: Path, data: Path, runs: Path, steps: int, geometry: str) -> dict:
    out = runs / name
    cmd = [sys.executable, "-m", "engine.cli", "train", "--model_name_or_path", str(model_dir), "--dataset", str(data),
           "--template", "default", "--output_dir", str(out), "--max_steps", str(steps), "--logging_steps", "1",
           "--save_strategy", "no", "--learning_rate", "1e-4", "--bf16", *CLASSIC, *flags.split()]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    from engine.rundir import read_events

    events = read_events(out)
    logs = [e for e in events if e["type"] == "log"]
    start = next((e for e in events if e["type"] == "start"), {})
    error = next((e["message"] for e in events if e["type"] == "error"), None)
    memory = logs[-1]["memory"] if logs else None
    speeds = sorted(e["tokens_per_s"] for e in logs[1:]) or [None]
    result = {
        "geometry": geometry, "config": name, "flags": flags, "steps": len(logs), "exit_code": proc.returncode,
        "peak_allocated_gib": memory and memory["max_allocated_gib"],
        "peak_reserved_gib": memory and memory["max_reserved_gib"],
        "nvml_used_gib": memory and memory.get("nvml_used_gib"),
        "tokens_per_s_median": speeds[len(speeds) // 2], "wall_s": round(time.time() - started, 1),
        "trainable_params": start.get("trainable_params"), "precision": start.get("precision"),
        "attention": start.get("attention"), "device": start.get("device"), "versions": start.get("versions"),
        "date": date.today().isoformat(), "error": error,
    }
    if proc.returncode != 0 and not error:
        result["error"] = proc.stdout[-800:] + proc.stderr[-800:]
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="llama2-7b", help="a catalog model whose geometry to build")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuner-bench"))
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, data = args.work / args.geometry, args.work / "long.json"
    if not (model_dir / "config.json").exists():
        t = time.time()
        build_model(args.geometry, model_dir)
        print(f"built {args.geometry} in {time.time() - t:.0f}s", flush=True)
    write_long_samples(data)
    for name, flags in CONFIGS:
        if args.only and name not in args.only:
            continue
        result = measure(name, flags, model_dir, data, args.work / "runs", args.steps, args.geometry)
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps({k: result[k] for k in ("config", "exit_code", "peak_allocated_gib", "peak_reserved_gib",
                                                 "nvml_used_gib", "tokens_per_s_median", "wall_s", "error")}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
