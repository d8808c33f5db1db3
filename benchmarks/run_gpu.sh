#!/usr/bin/env bash
# One device call: versions, the GPU test suite, then the experts benchmark.
# Usage (on the GPU machine, from the repo root): bash benchmarks/run_gpu.sh [bench args...]
# Writes gpu-tests.log, experts.json, bench.log and profile.txt to $OUT (default: ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
python3 benchmarks/bench_experts.py --out "$OUT/experts.json" "$@" 2>&1 | tee "$OUT/bench.log"
# Where the time goes, for the notes: the Qwen3 shape at 16384 tokens, moetune and the baseline.
for provider in grouped_mm baseline; do
    python3 benchmarks/bench_experts.py --profile qwen3-30b-a3b 16384 $provider 2>&1 | grep -v USDT
done > "$OUT/profile.txt"
head -40 "$OUT/profile.txt"
