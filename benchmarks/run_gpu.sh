#!/usr/bin/env bash
# One device call: versions, the GPU test suite, then the experts benchmark.
# Usage (on the GPU machine, from the repo root): bash benchmarks/run_gpu.sh [bench args...]
# Writes gpu-tests.log, experts.json and bench.log to $OUT (default: ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
python3 benchmarks/bench_experts.py --out "$OUT/experts.json" "$@" 2>&1 | tee "$OUT/bench.log"
