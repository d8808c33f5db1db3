#!/usr/bin/env bash
# Issue #6's side-by-side in one device call: one random-initialised checkpoint (Qwen3-30B-A3B cut to 8 layers),
# then transformers+PEFT, Unsloth 2026.10.9 (its offloaded checkpointing, and none) and moetune (every layer
# checkpointed, `--checkpoint-layers auto`, moetune train's default: as few as memory needs, and auto replayed from a
# CUDA graph, `--cuda-graph on`) on it, one process per variant (each runs every context), then the plot. On the GPU
# machine, from the repo root, with the wheels of benchmarks/unsloth_wheels.sh carried as .whl/unsloth:
#
#     bash benchmarks/compare_unsloth.sh [SEQ ...]        # default 4096 8192 16384 32768; writes to $OUT
#     VARIANTS="unsloth unsloth-nockpt" bash benchmarks/compare_unsloth.sh 8192   # some variants only
#
# VARIANTS (default all: moetune moetune-auto moetune-graph baseline unsloth unsloth-nockpt) splits the comparison over
# calls that each fit the device tool's 10 minutes; the plot takes every variant's JSON found in $OUT.
# About 9 minutes on an H200 for the four contexts (Unsloth compiles for ~1 minute first). A variant that fails
# is reported and the others still run; out-of-memory rows are results.
set -uo pipefail
OUT=${OUT:-compare-out}
mkdir -p "$OUT"
read -ra SEQS <<< "${*:-4096 8192 16384 32768}"
CK=${CHECKPOINT:-/tmp/qwen3-30b-a3b-x8}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
read -ra VARIANTS <<< "${VARIANTS:-moetune moetune-auto moetune-graph baseline unsloth unsloth-nockpt}"
failed=()
chosen() { [[ " ${VARIANTS[*]} " == *" $1 "* ]]; }
quiet() { grep -v "Warning\|warn\|Loading weights\|USDT\|Writing model\|tuning"; }
step() {  # step NAME ARGS...: one train_step.py process
    local name=$1; shift
    python3 benchmarks/train_step.py --checkpoint "$CK" --layers 8 --warmup 3 --steps 10 --seq "${SEQS[@]}" \
        --out "$OUT/$name.json" "$@" 2>&1 | quiet
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}
unsloth() {  # unsloth NAME ARGS...: one unsloth_step.py process
    local name=$1; shift
    env PYTHONPATH="/tmp/unsloth-site:$PYTHONPATH" HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 \
        UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache \
        python3 benchmarks/unsloth_step.py --checkpoint "$CK" --layers 8 --warmup 3 --steps 10 --seq "${SEQS[@]}" \
        --out "$OUT/$name.json" "$@" 2>&1 | grep "tok/s\|out of memory\|Error"
    [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}
chosen moetune && step moetune --providers moetune
chosen moetune-auto && step moetune-auto --providers moetune --checkpoint-layers auto
chosen moetune-graph && step moetune-graph --providers moetune --checkpoint-layers auto --cuda-graph on
chosen baseline && step baseline --providers baseline
if chosen unsloth || chosen unsloth-nockpt; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/unsloth-site .whl/unsloth/*.whl; then
        chosen unsloth && unsloth unsloth
        chosen unsloth-nockpt && unsloth unsloth-nockpt --gradient-checkpointing off
    else
        failed+=("unsloth (wheels: bash benchmarks/unsloth_wheels.sh, carry .whl/unsloth)")
    fi
fi
results=()
for name in baseline unsloth unsloth-nockpt moetune moetune-auto moetune-graph; do
    [ -f "$OUT/$name.json" ] && results+=("$OUT/$name.json")
done
[ ${#results[@]} -gt 0 ] && python3 benchmarks/plot_train_step.py "$OUT/compare.png" "${results[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
