#!/usr/bin/env bash
# Issue #6's side-by-side in one device call: one random-initialised checkpoint (Qwen3-30B-A3B cut to 8 layers),
# then transformers+PEFT, Unsloth 2026.10.9 (its offloaded checkpointing, and none) and moetune (every layer
# checkpointed, and none) on it, each context in its own process, then the plot. On the GPU machine, from the
# repo root, with the wheels of benchmarks/unsloth_wheels.sh carried as .whl/unsloth:
#
#     bash benchmarks/compare_unsloth.sh [SEQ ...]        # default 4096 8192 16384 32768; writes to $OUT
#
# About 9 minutes on an H200 for the four contexts (Unsloth compiles for ~1 minute first).
set -uo pipefail
OUT=${OUT:-compare-out}
mkdir -p "$OUT"
SEQS=("${@:-4096 8192 16384 32768}")
SEQS=(${SEQS[*]})
CK=${CHECKPOINT:-/tmp/qwen3-30b-a3b-x8}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
quiet() { grep -v "Warning\|warn\|Loading weights\|USDT\|Writing model\|tuning"; }
step="python3 benchmarks/train_step.py --checkpoint $CK --layers 8 --warmup 3 --steps 6"
$step --providers moetune --seq "${SEQS[@]}" --out "$OUT/moetune.json" 2>&1 | quiet
$step --providers moetune --seq "${SEQS[@]}" --checkpoint-layers 0 --out "$OUT/moetune-nockpt.json" 2>&1 | quiet
# transformers+PEFT needs ~40 GiB at 16K and more beyond: out-of-memory rows are results too.
$step --providers baseline --seq "${SEQS[@]}" --out "$OUT/baseline.json" 2>&1 | quiet
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/unsloth-site \
    .whl/unsloth/*.whl || exit 1
unsloth="env PYTHONPATH=/tmp/unsloth-site:$PYTHONPATH HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
    UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache python3 benchmarks/unsloth_step.py --checkpoint $CK
    --layers 8 --warmup 3 --steps 6"
$unsloth --seq "${SEQS[@]}" --out "$OUT/unsloth.json" 2>&1 | grep "tok/s\|out of memory\|Error"
$unsloth --seq "${SEQS[@]}" --gradient-checkpointing off --out "$OUT/unsloth-nockpt.json" 2>&1 \
    | grep "tok/s\|out of memory\|Error"
python3 benchmarks/plot_train_step.py "$OUT/compare.png" "$OUT"/baseline.json "$OUT"/unsloth.json \
    "$OUT"/unsloth-nockpt.json "$OUT"/moetune.json "$OUT"/moetune-nockpt.json
