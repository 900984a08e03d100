"""`tuner train` with its defaults against the plain TRL + PEFT recipe, on the same card and the same token sequences.

The plain recipe is what TRL's SFTTrainer and PEFT do with the classic settings: each batch padded to its longest
sample, gradient checkpointing on, TRL's own loss, SDPA attention. `tuner train` gets the same user flags (method,
LoRA targets, micro-batch, accumulation, learning rate, epochs) and picks the rest itself (padding-free rows,
attention, Liger, auto-fit). Each runs as its own process, interleaved round by round; both train on the rows the
engine tokenized, so the trained (non-padding) tokens are the same. Printed per configuration: trained tokens/s
(median over rounds), peak GPU memory, MFU and the ratio, and how close the two loss curves are.

Both sides are timed by the same code (StepClock, added to every Trainer of each process) at the same points, with the
same optimizer (tuner's default unless --optim says otherwise): the first --warmup optimizer steps are left out (on a
GPU: Liger's Triton compilation, cuBLAS's first calls, the allocator's growth), the time is taken at each step's end
after a CUDA synchronize, the trained tokens are counted at the model's forward, and peak memory is reset when
training begins (the model loaded and on its device).

    python3 bench/speed.py                                   # CPU: the tiny Llama on 160 alpaca samples, 3 rounds
    python3 bench/speed.py --samples 48 --rounds 1           # the CI-sized form
    python3 bench/speed.py --geometry llama2-7b --jsonl speed-h200.jsonl     # a GPU: LoRA and QLoRA, two length mixes
    python3 bench/speed.py --geometry tiny-llama --only qlora4-fixed512 --samples 16 --warmup 1 --rounds 1  # on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
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
WARMUP_STEPS = 2

# bf16 dense tensor-core peak in TFLOPS (the datasheets' figures, halved where they quote sparsity), keyed by the
# words of the name torch.cuda.get_device_name / NVML report, less the vendor and the memory size (card_words).
# A name that is not here exactly (a bare "NVIDIA H100", a MIG slice, an unlisted card) gets no MFU.
PEAK_BF16_TFLOPS = {
    frozenset({"h100", "hbm3"}): 989.4,  # "NVIDIA H100 80GB HBM3": the SXM5 card
    frozenset({"h100", "pcie"}): 756.0,
    frozenset({"h100", "nvl"}): 835.0,
    frozenset({"h200"}): 989.4,
    frozenset({"h200", "nvl"}): 835.5,
    frozenset({"a100", "sxm4"}): 312.0,  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB"
    frozenset({"a100", "pcie"}): 312.0,  # "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB"
    frozenset({"l40s"}): 362.0,
    frozenset({"l4"}): 121.0,
    frozenset({"rtx", "4090"}): 165.2,  # "NVIDIA GeForce RTX 4090", fp32 accumulation
    frozenset({"a10g"}): 70.0,
    frozenset({"b200"}): 2250.0,
}
FLOPS_FORMULA = "6N + 12 x layers x hidden x seq_len per token, N = parameters less the input embedding"

# (name, flags the user would type, data): the configurations; alpaca = alpaca-like lengths
LORA = ("--finetuning_type lora --lora_target q_proj,v_proj --per_device_train_batch_size 2 "
        "--gradient_accumulation_steps 4")
QLORA4 = LORA.replace("lora ", "lora --quantization_bit 4 ", 1)
GPU_CONFIGS = [
    ("lora-alpaca", LORA, "alpaca"),
    ("qlora4-alpaca", QLORA4, "alpaca"),
    ("lora-fixed512", LORA + " --cutoff_len 512", "fixed512"),
    ("qlora4-fixed512", QLORA4 + " --cutoff_len 512", "fixed512"),
]
CPU_CONFIGS = GPU_CONFIGS[:1]


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


# --- the clock, the same in both contenders' processes ---------------------------------------------------------------


def install_clock(report: Path) -> None:
    """Adds a StepClock to every Trainer this process builds (transformers' DEFAULT_CALLBACKS), so the plain recipe
    and `tuner train` are timed by the same code at the same points. It writes ``report`` when training ends: the
    time and the trained tokens so far when training began and at each optimizer step's end, peak memory since
    training began, the card."""
    import torch
    from transformers import TrainerCallback
    from transformers import trainer as trainer_module

    cuda = torch.cuda.is_available()

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            """Again after auto-fit's back-off (a second train()): the failed attempt counts for nothing."""
            if getattr(self, "hook", None) is not None:
                self.hook.remove()
            self.tokens, self.pending = 0, []
            self.hook = model.register_forward_pre_hook(self.count, with_kwargs=True)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.step_ends, self.tokens_at_end = [time.perf_counter()], [0]  # training's start: "step 0" ends

        def count(self, module, args, kwargs):
            """The non-padding tokens of a micro-batch: a padded batch's mask (summed on the device, read at the
            step's end), or the whole row of a padding-free one."""
            mask = kwargs.get("attention_mask")
            if mask is not None:
                self.pending.append(mask.sum())
            else:
                self.tokens += kwargs["input_ids"].numel()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.step_ends.append(time.perf_counter())
            self.tokens += sum(int(t) for t in self.pending)
            self.pending = []
            self.tokens_at_end.append(self.tokens)

        def on_train_end(self, args, state, control, **kwargs):
            self.hook.remove()
            gib = 1024**3
            report.write_text(json.dumps({
                "step_ends": self.step_ends, "tokens_at_end": self.tokens_at_end,
                "card": torch.cuda.get_device_name() if cuda else "cpu",
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3) if cuda else None,
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3) if cuda else None,
                "versions": versions(),
            }))

    trainer_module.DEFAULT_CALLBACKS.append(StepClock())


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "liger-kernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def timed(step_ends: list[float], tokens_at_end: list[int], warmup: int) -> dict:
    """Seconds, trained tokens and optimizer steps from the end of step ``warmup`` to the end of the last step (the
    clock's lists start with training's start, step 0). Each side's steps are its own: auto-fit may put more or
    fewer tokens in a step than the plain recipe does, so the tokens are counted, not assumed."""
    steps = len(step_ends) - 1
    if steps <= warmup:
        raise SystemExit(f"{steps} optimizer steps, none left after {warmup} warm-up steps: give more --samples "
                         "or a smaller --warmup")
    seconds = step_ends[-1] - step_ends[warmup]
    tokens = tokens_at_end[-1] - tokens_at_end[warmup]
    return {"seconds": round(seconds, 4), "tokens": tokens, "steps": steps - warmup,
            "tokens_per_s": round(tokens / seconds, 1)}


# --- the two contenders, each a process ----------------------------------------------------------------------------


def common_flags(model: Path, data: Path, epochs: float) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset", str(data), "--template", "alpaca",
            "--num_train_epochs", str(epochs), "--learning_rate", "1e-4", "--logging_steps", "1",
            "--save_strategy", "no", "--seed", "42"]


def run_tuner(model: Path, data: Path, flags: str, epochs: float, optim: str, out: Path) -> dict:
    clock = out.with_name(out.name + "-clock.json")
    clock.unlink(missing_ok=True)
    train = ["train", *common_flags(model, data, epochs), *flags.split(), "--optim", optim,
             "--output_dir", str(out), "--overwrite_output_dir", "true"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--clock", str(clock), "--tuner", *train]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    from engine.rundir.events import read_events

    events = read_events(out)
    end = next((e for e in reversed(events) if e["type"] == "end"), {})
    if proc.returncode != 0 or "runtime_s" not in end or not clock.is_file():
        raise SystemExit(f"tuner train failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    start = next(e for e in reversed(events) if e["type"] == "start")  # after a back-off: the layout that trained
    return {"clock": json.loads(clock.read_text()), "losses": [e["loss"] for e in events if e["type"] == "log"],
            "speed": start.get("speed"), "batch": start.get("batch")}


def run_plain(rows: Path, model: Path, flags: str, epochs: float, optim: str, out: Path) -> dict:
    clock = out.with_name(out.name + "-clock.json")
    clock.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(rows), "--model", str(model),
           "--flags", flags, "--epochs", str(epochs), "--optim", optim, "--work", str(out), "--clock", str(clock)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not clock.is_file():
        raise SystemExit(f"the plain recipe failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return {"clock": json.loads(clock.read_text()), **json.loads(proc.stdout.strip().splitlines()[-1])}


def plain_recipe(rows_path: Path, model_path: Path, flags: str, epochs: float, optim: str, work: Path) -> dict:
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
                     learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[], seed=42, optim=optim,
                     gradient_checkpointing=True, bf16=gpu, use_cpu=not gpu, max_length=cfg.data.cutoff_len,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return {"losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]}


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


def build_random_model(geometry: str, work: Path) -> Path:
    """The catalog geometry with random weights, built once under ``work`` (into a temporary folder renamed when
    whole, so a build cut short is not taken for a model next time)."""
    from bench.gpu_memory import build_model

    model = work / geometry
    if not (model / "config.json").exists():
        partial = work / f"{geometry}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_model(geometry, partial)
        partial.rename(model)
    return model


# --- figures ---------------------------------------------------------------------------------------------------


def flops_per_token(geometry, seq_len: float) -> float:
    """Model FLOPs per trained token, as torchtitan, PaLM and Unsloth count them, so MFU compares across methods and
    tools: 6N + 12 x layers x hidden x seq_len. N is the parameter count less the input embedding (the LM head's
    matmul is counted); 6N is forward (2N) and backward (4N) through every weight, counted for LoRA and QLoRA too
    (their backward skips the frozen weights' gradients, which MFU then shows as lost); 12 x layers x hidden x
    seq_len is QK^T and AV, forward and backward, over each token's sequence. ``seq_len``: the trained samples'
    length averaged over their tokens (sum L^2 / sum L), the sequence each token attends within, padding-free or
    not. Recomputation under checkpointing is not counted (it is a cost that MFU exposes)."""
    from engine.models.catalog import param_count

    non_embedding = param_count(geometry) - geometry.vocab_size * geometry.hidden_size
    attention = 12 * geometry.num_hidden_layers * geometry.num_attention_heads * geometry.head_dim * seq_len
    return 6 * non_embedding + attention


def card_words(card: str) -> frozenset[str]:
    """The words of a card's name that tell cards apart: lower case, without the vendor and the memory size."""
    words = re.split(r"[^a-z0-9]+", card.lower())
    return frozenset(w for w in words if w not in {"", "nvidia", "geforce", "tesla"} and not re.fullmatch(r"\d+gb", w))


def peak_flops(card: str | None) -> float | None:
    """The bf16 dense peak FLOPS of the card named so (torch.cuda.get_device_name, NVML), or None when the name is
    not one of PEAK_BF16_TFLOPS's exactly: an MFU against another card's peak would mislead."""
    tflops = PEAK_BF16_TFLOPS.get(card_words(card)) if card else None
    return tflops * 1e12 if tflops else None


def loss_agreement(ours: list[float], plain: list[float]) -> dict:
    """How close the curves are: the mean loss over the last quarter of each, and its relative difference."""
    def tail(losses):
        return statistics.fmean(losses[-max(1, len(losses) // 4):])

    a, b = tail(ours), tail(plain)
    return {"ours_final_quarter": round(a, 4), "plain_final_quarter": round(b, 4),
            "relative_difference": round(abs(a - b) / abs(b), 4), "steps": [len(ours), len(plain)]}


def side_summary(runs: list[dict], warmup: int, per_token: float, peak: float | None) -> dict:
    """One contender's rounds: the median timed tokens/s, its MFU, the last round's peak memory."""
    times = [timed(r["clock"]["step_ends"], r["clock"]["tokens_at_end"], warmup) for r in runs]
    tokens_per_s = statistics.median(t["tokens_per_s"] for t in times)
    last = runs[-1]["clock"]
    return {"tokens_per_s": round(tokens_per_s, 1), "timed": times,
            "mfu": round(tokens_per_s * per_token / peak, 4) if peak else None,
            "peak_allocated_gib": last["peak_allocated_gib"], "peak_reserved_gib": last["peak_reserved_gib"]}


def percent(mfu: float | None) -> str:
    return "unknown" if mfu is None else f"{mfu:.1%}"


def main() -> int:
    from engine.config.schema import TrainArgs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default=None, help="a catalog geometry to build with random weights "
                        "(llama2-7b on a GPU); default: the tiny-llama demo model")
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--only", nargs="*", help="configuration names to run: "
                        + ", ".join(name for name, _, _ in GPU_CONFIGS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuner-speed"))
    parser.add_argument("--out", type=Path, help="append one JSON line per configuration here")
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per configuration and side here")
    parser.add_argument("--warmup", type=int, default=WARMUP_STEPS,
                        help=f"optimizer steps of each side left out of the timing (default {WARMUP_STEPS})")
    parser.add_argument("--optim", default=TrainArgs.optim,
                        help=f"the optimizer of both sides (default: tuner's, {TrainArgs.optim})")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--flags", default="", help=argparse.SUPPRESS)
    parser.add_argument("--clock", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tuner", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if args.tuner is not None:
        install_clock(args.clock)
        from engine.cli import main as tuner_main

        return tuner_main(args.tuner)
    if args.plain:
        install_clock(args.clock)
        print(json.dumps(plain_recipe(args.plain, args.model, args.flags, args.epochs, args.optim, args.work)))
        return 0

    import torch
    from transformers import AutoTokenizer

    from engine.models.catalog import lookup
    from engine.models.demo import demo_model_path

    unknown = sorted(set(args.only or ()) - {name for name, _, _ in GPU_CONFIGS})
    if unknown:
        raise SystemExit(f"no configuration named {', '.join(unknown)}: "
                         f"the configurations are {', '.join(name for name, _, _ in GPU_CONFIGS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    if args.geometry:
        model, geometry = build_random_model(args.geometry, args.work), lookup(args.geometry).geometry
    else:
        model, geometry = demo_model_path("tiny-llama"), lookup("tiny-llama").geometry
    tokenizer = AutoTokenizer.from_pretrained(model)
    configs = GPU_CONFIGS if gpu or args.only else CPU_CONFIGS  # --only: any of them, a GPU's on a CPU too
    command = "python3 bench/speed.py " + " ".join(sys.argv[1:])
    print(f"both sides: optimizer {args.optim}; the first {args.warmup} optimizer steps untimed; peak memory since "
          f"training began; MFU = tokens/s x ({FLOPS_FORMULA}) / the card's bf16 dense peak", flush=True)
    for name, flags, kind in configs:
        if args.only and name not in args.only:
            continue
        real_alpaca = kind == "alpaca" and not args.geometry and ALPACA.is_file()
        data = write_data(args.work, tokenizer, args.samples, kind, real_alpaca)
        rows, lengths = engine_rows(model, data, flags, args.work / f"rows-{name}.json")
        ours_runs, plain_runs = [], []
        for _ in range(args.rounds):  # interleaved, so a slow moment of the machine hits both alike
            plain_runs.append(run_plain(rows, model, flags, args.epochs, args.optim, args.work / "plain"))
            ours_runs.append(run_tuner(model, data, flags, args.epochs, args.optim, args.work / "ours"))
        card = ours_runs[-1]["clock"]["card"]
        seq_len = sum(n * n for n in lengths) / sum(lengths)
        per_token, peak = flops_per_token(geometry, seq_len), peak_flops(card)
        plain = side_summary(plain_runs, args.warmup, per_token, peak)
        ours = side_summary(ours_runs, args.warmup, per_token, peak)
        ratio = round(ours["tokens_per_s"] / plain["tokens_per_s"], 2)
        loss = loss_agreement(ours_runs[-1]["losses"], plain_runs[-1]["losses"])
        cfg_flags = set(flags.split())
        method = "qlora-4bit" if "--quantization_bit" in cfg_flags else "lora"
        data_name = "alpaca_en_demo" if real_alpaca else {"alpaca": "alpaca-like", "fixed512": "fixed-512"}[kind]
        shared = {
            "case": name, "method": method, "lengths": data_name, "card": card,
            "precision": "bf16" if gpu else "fp32", "model": args.geometry or "tiny-llama (demo weights)",
            "samples": len(lengths), "mean_length": round(sum(lengths) / len(lengths), 1), "epochs": args.epochs,
            "optimizer": args.optim, "warmup_steps": args.warmup, "rounds": args.rounds, "flags": flags,
            "flops_per_token": round(per_token), "flops_formula": FLOPS_FORMULA, "seq_len": round(seq_len, 1),
            "peak_tflops": peak and peak / 1e12, "ratio": ratio,
            "versions": ours_runs[-1]["clock"]["versions"], "date": date.today().isoformat(), "command": command,
        }
        print(f"{name}: plain {plain['tokens_per_s']:.0f} tokens/s, tuner {ours['tokens_per_s']:.0f} tokens/s, ratio "
              f"{ratio:.2f}x; peak allocated GiB {plain['peak_allocated_gib']} vs {ours['peak_allocated_gib']}; MFU "
              f"{percent(plain['mfu'])} vs {percent(ours['mfu'])} ({card}"
              f"{f', {peak / 1e12:g} TFLOPS bf16' if peak else ': not in the table of peaks'}); final-quarter loss "
              f"{loss['plain_final_quarter']} vs {loss['ours_final_quarter']} "
              f"({loss['relative_difference']:.1%} apart)", flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                for side, summary in (("plain", plain), ("tuner", ours)):
                    f.write(json.dumps({**shared, "side": side, **summary}) + "\n")
        if args.out:
            result = {
                "config": name, "flags": flags, "data": "alpaca_en_demo" if real_alpaca else kind,
                "samples": len(lengths), "trained_tokens": int(sum(lengths) * args.epochs), "rounds": args.rounds,
                "optimizer": args.optim, "warmup_steps": args.warmup,
                "plain_tokens_per_s": plain["tokens_per_s"], "tuner_tokens_per_s": ours["tokens_per_s"],
                "ratio": ratio, "plain_timed": plain["timed"], "tuner_timed": ours["timed"],
                "plain_peak_allocated_gib": plain["peak_allocated_gib"],
                "tuner_peak_allocated_gib": ours["peak_allocated_gib"],
                "plain_mfu": plain["mfu"], "tuner_mfu": ours["mfu"], "flops_formula": FLOPS_FORMULA,
                "loss": loss, "tuner_speed": ours_runs[-1]["speed"], "tuner_batch": ours_runs[-1]["batch"],
                "device": card, "versions": shared["versions"], "date": shared["date"], "command": command,
            }
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
        shutil.rmtree(args.work / "ours", ignore_errors=True)
        shutil.rmtree(args.work / "plain", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
