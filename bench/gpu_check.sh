#!/usr/bin/env bash
# The GPU check, one script of at most ~8 minutes on one H100/H200 (issue 24): every kernel path against the
# reference (`tuner doctor --gpu`), the speed race of our defaults against the plain TRL + PEFT recipe (LoRA bf16 and
# QLoRA 4-bit; alpaca-like lengths and fixed 512 tokens; Llama-2-7B geometry), then the VRAM estimator against the
# peaks measured on the card. Everything lands in OUT/gpu-<card>-<date>.jsonl, one JSON object a line (a header with
# card, versions, date and command first), and a summary is printed at the end; exit 1 when a check failed.
#
#   bash bench/gpu_check.sh [OUT]             # on a GPU machine (OUT defaults to bench/results)
#   bash bench/gpu_check.sh --dry-run OUT     # on a CPU: the same steps at toy size, a minute or two (a test runs it)
#
# On the lent device machine: its image has torch, transformers, peft and accelerate (older releases than this
# checkout is tested with, 2026-11: torch 2.11, transformers 5.17) but not trl, datasets, bitsandbytes or
# liger-kernel. Here, first: `bash ../shared/gpu/wheels.sh transformers==5.25.0 peft==0.21.2 accelerate==1.16.0`
# (wheels into .whl/, git-ignored; carry `.whl`), then there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && bash bench/gpu_check.sh "$OUT"
# The results file's header records the versions that ran.
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=$(realpath -m "${1:-bench/results}")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
card=$(python3 bench/gpu_check_report.py card) || exit 2
if [ "$card" = cpu ] && [ $dry = 0 ]; then
  echo "bench/gpu_check.sh: no CUDA device here; on a CPU run it as: bash bench/gpu_check.sh --dry-run OUT" >&2
  exit 2
fi
work=${TUNER_GPU_CHECK_WORK:-$(mktemp -d /tmp/tuner-gpu-check.XXXXXX)}
[ -n "${TUNER_GPU_CHECK_WORK:-}" ] || trap 'rm -rf "$work"' EXIT  # the built models go, even on Ctrl-C; results stay
trap 'echo "bench/gpu_check.sh: interrupted; what was measured so far is in $out" >&2; exit 130' INT TERM HUP
mkdir -p "$out" "$work"
results="$out/gpu-$card-$(date -u +%F).jsonl"
failed=0
step() { echo "== $* ($(date -u +%T))"; }

step "header"
python3 bench/gpu_check_report.py header --command "bash bench/gpu_check.sh $*$([ $dry = 1 ] && echo ' --dry-run')" \
  >> "$results"

step "1/3 tuner doctor --gpu: every kernel path against the reference"
timeout 200 python3 -m engine.cli doctor --gpu --json > "$work/doctor.json"
doctor=$?
[ $doctor -eq 0 ] || failed=1
python3 bench/gpu_check_report.py doctor "$work/doctor.json" $doctor >> "$results"

step "2/3 bench/speed.py: our defaults against the plain recipe"
if [ $dry = 1 ]; then
  speed=(--geometry tiny-llama --only qlora4-fixed512 --samples 16 --warmup 1 --rounds 1)
else
  speed=(--geometry llama2-7b --only lora-alpaca qlora4-alpaca lora-fixed512 qlora4-fixed512 --samples 48 --rounds 1)
fi
timeout 330 python3 bench/speed.py "${speed[@]}" --work "$work/models" --jsonl "$results" || failed=1

step "3/3 bench/gpu_memory.py: the estimator against the measured peaks"
if [ $dry = 1 ]; then
  memory=(--geometry tiny-llama --steps 2 --only lora-b1-s512)
else
  memory=(--geometry llama2-7b --steps 3 --only lora-b1-s512 qlora4-b1-s512)
fi
# the same --work: the random model speed.py built is used again (13.5 GB at 7B, not built twice)
timeout 150 python3 bench/gpu_memory.py "${memory[@]}" --work "$work/models" --out "$work/memory.jsonl" || failed=1
python3 bench/gpu_check_report.py estimates "$work/memory.jsonl" >> "$results"

step "summary: $results"
python3 bench/gpu_check_report.py summary "$results" || failed=1
exit $failed
