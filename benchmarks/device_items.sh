#!/usr/bin/env bash
# The measurements benchmarks/NOTES.md asks of a device call, as named items, so that a call is one line:
#
#     bash benchmarks/device_items.sh RUN ITEM [ITEM ...]
#     bash benchmarks/device_items.sh 90a suite:f:400 experts       # e.g.; carry .whl/trl (device_env.sh)
#
# RUN names the files (NAME-runRUN-GPU.json / .log, GPU = H100 or H200 from torch's device name) and heads each log
# with "# runRUN, <device name>, <UTC time>"; they go to $OUT (default ./device-out). Items:
#   suite:PART[:LIMIT]          the GPU-marked tests in parts that each fit a call cold (one part of everything ran
#                               out of 560 s in run 82, compiling every kernel): b tests/models, tests/training,
#                               tests/benchmarks; c tests/experts and tests/test_*.py; d the per-layer kernels;
#                               e latent attention, norms, shared memory, the Gluon GEMM; f the rest of tests/kernels
#                               but g; g grouped_gemm's every-candidate-config tests (cold, each compiles every
#                               candidate twice: f with them ran out at 230 and 430 s, runs 89e and 90b). Under
#                               `timeout LIMIT` (seconds, default 300); -rs names the skips.
#   experts                     bench_experts.py, issue #5's block table (every shape, the baseline beside)
#   wgrad                       wgrad_split_ab.py, the LoRA weight gradients split and not, against float64
#   switch:NAME                 switch_ab.py --switch NAME, both ways of a launch-time switch in alternating rounds,
#                               on issue #5's four 16K / 4K blocks (SWITCH_CASES)
#   routing:MODEL:LAYERS:SEQ    routing_load.py, a model's rows per expert layer by layer, the launches under them
#   cut:on|off[:OPTIM]          issue #6's 8-layer Qwen3 cut at 16K and 32K, moetune alone, replayed (on) or eager
#   MODEL:GIB:on|off[:both]     a whole model at 8K under --max-memory GIB as issue #6's table runs it (bf16 AdamW
#                               states, the step in backward, the memory plan); both: transformers + PEFT beside
# Every item is checked before the first runs (a bad one: exit 2, nothing run). Exit status: how many items failed.
set -uo pipefail

usage() { echo "usage: bash benchmarks/device_items.sh RUN ITEM [ITEM ...] (items: see the script's header)" >&2; exit 2; }
[ $# -ge 2 ] || usage
RUN=$1; shift
[[ $RUN =~ ^[A-Za-z0-9]+$ ]] || { echo "RUN: expected letters and digits (e.g. 90a), got '$RUN'" >&2; exit 2; }

PARTS_D="launch rotary router_topk sigmoid_router_topk sum_over_k swiglu"
PARTS_E="mla_inputs rms_norm shared_memory hopper_gemm"
EVERY_CANDIDATE=every_candidate_config_in_bf16  # part g's tests (grouped_gemm's), left out of part f
MODELS="qwen3-30b-a3b gpt-oss-20b glm-4.7-flash"
SWITCHES="direct persistent gluon sum wgrad_split wgrad_stream"  # switch_ab.py's
SWITCH_CASES="qwen3-30b-a3b:16384 qwen3-30b-a3b:4096 gpt-oss-20b:16384 glm-4.7-flash:16384"

check() {  # check ITEM: empty if well formed, else why not
    local a b c d
    IFS=: read -r a b c d <<< "$1"
    case "$a" in
        suite) [[ $b =~ ^[bcdefg]$ && ( -z $c || $c =~ ^[0-9]+$ ) && -z $d ]] || echo "expected suite:b|c|d|e|f|g[:SECONDS]";;
        experts|wgrad) [ "$a" = "$1" ] || echo "takes no arguments";;
        switch) [[ " $SWITCHES " == *" $b "* && -z $c ]] || echo "expected switch:NAME, NAME one of $SWITCHES";;
        routing) [[ " $MODELS " == *" $b "* && $c =~ ^[0-9]+$ && $d =~ ^[0-9]+$ ]] \
            || echo "expected routing:MODEL:LAYERS:SEQ, MODEL one of $MODELS";;
        cut) [[ $b =~ ^(on|off)$ && ( -z $c || $c =~ ^(adamw|adamw_bf16|adamw_8bit)$ ) && -z $d ]] \
            || echo "expected cut:on|off[:adamw|adamw_bf16|adamw_8bit]";;
        *) [[ " $MODELS " == *" $a "* && $b =~ ^[0-9]+(\.[0-9]+)?$ && $c =~ ^(on|off)$ && ( -z $d || $d == both ) ]] \
            || echo "expected suite:..., experts, wgrad, routing:..., cut:... or MODEL:GIB:on|off[:both], MODEL one of $MODELS";;
    esac
}
for item in "$@"; do
    why=$(check "$item")
    [ -z "$why" ] || { echo "item '$item': $why" >&2; exit 2; }
done

source benchmarks/device_env.sh > /dev/null 2>&1
NAME=$(python3 -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null)
case "$NAME" in *H200*) GPU=H200;; *H100*) GPU=H100;; *) GPU=GPU;; esac
OUT=${OUT:-device-out}
mkdir -p "$OUT"
failed=0

part_paths() {  # the test files of suite part $1 that exist in this checkout
    local name names=() kernels=()
    case "$1" in
        b) names=(tests/models tests/training tests/benchmarks);;
        c) names=(tests/experts tests/test_*.py);;
        d) for name in $PARTS_D; do names+=("tests/kernels/test_$name.py"); done
           names+=(tests/benchmarks/test_sum_over_k_ab.py);;
        e) for name in $PARTS_E; do names+=("tests/kernels/test_$name.py"); done;;
        f) for name in tests/kernels/test_*.py; do
               name=${name#tests/kernels/test_}; name=${name%.py}
               [[ " $PARTS_D $PARTS_E " == *" $name "* ]] || kernels+=("tests/kernels/test_$name.py")
           done
           names=("${kernels[@]}");;
        g) names=(tests/kernels/test_grouped_gemm.py);;
    esac
    for name in "${names[@]}"; do [ -e "$name" ] && echo "$name"; done
}

run_item() {  # run_item FILE_STEM COMMAND...: its output into FILE_STEM.log under a header; the status is the command's
    local log="$OUT/$1-run$RUN-$GPU.log" status; shift
    { echo "# run$RUN, ${NAME:-unknown GPU}, $(date -u +%Y-%m-%dT%H:%M:%SZ)"; "$@" 2>&1; } > "$log"
    status=$?
    tail -8 "$log"
    return "$status"
}

for item in "$@"; do
    IFS=: read -r a b c d <<< "$item"
    case "$a" in
        suite)
            mapfile -t paths < <(part_paths "$b")
            select=()
            case "$b" in
                f) select=(-k "not $EVERY_CANDIDATE");;
                g) select=(-k "$EVERY_CANDIDATE");;
            esac
            run_item "gpu-tests-$b" timeout "${c:-300}" python3 -m pytest -q -rs -m gpu --durations=3 "${select[@]}" \
                "${paths[@]}";;
        experts)
            run_item experts python3 benchmarks/bench_experts.py --out "$OUT/experts-run$RUN-$GPU.json";;
        wgrad)
            run_item wgrad-split python3 benchmarks/wgrad_split_ab.py --out "$OUT/wgrad-split-run$RUN-$GPU.json";;
        switch)
            run_item "switch-$b" python3 benchmarks/switch_ab.py --switch "$b" --cases $SWITCH_CASES \
                --out "$OUT/switch-$b-run$RUN-$GPU.json";;
        routing)
            stem="routing-load-$b-$c-$d"
            run_item "$stem" python3 benchmarks/routing_load.py --model "$b" --layers "$c" --seq "$d" \
                --out "$OUT/$stem-run$RUN-$GPU.json";;
        cut)
            stem="train-step-cut-graph$b"
            run_item "$stem" python3 benchmarks/train_step.py --layers 8 --seq 16384 32768 --providers moetune \
                --checkpoint-layers auto --optim "${c:-adamw}" --cuda-graph "$b" --warmup 3 --steps 10 \
                --out "$OUT/$stem-run$RUN-$GPU.json";;
        *)
            stem="train-step-${a%%-*}-whole-8k-graph$c"
            providers=(--providers moetune); [ "$d" = both ] && providers=(--providers baseline moetune)
            run_item "$stem" python3 benchmarks/train_step.py --model "$a" --seq 8192 "${providers[@]}" \
                --optim adamw_bf16 --step-in-backward --checkpoint-layers auto --max-memory "$b" --cuda-graph "$c" \
                --warmup 2 --steps 6 --out "$OUT/$stem-run$RUN-$GPU.json";;
    esac || failed=$((failed + 1))
done
exit "$failed"
