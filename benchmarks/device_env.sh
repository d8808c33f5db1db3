# Source at the start of every device call (a fresh machine has none of this; a warm one keeps /tmp and .autotune):
#     source benchmarks/device_env.sh
# - PYTHONPATH to this checkout, and to /tmp/site where `.whl/trl` was carried (trl, datasets, dill, multiprocess:
#   the device image lacks them and tests/training imports trl's chat templates);
# - the autotune cache in .autotune (gitignored): run 60's H100 picks copied on an H100, seeded under this GPU's name
#   elsewhere (benchmarks/seed_autotune.py; timings then run another GPU's configs: say so), so that no call spends
#   its minutes tuning cold (run 57a: > 530 s for three shapes).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import trl" 2>/dev/null && compgen -G ".whl/trl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/trl/*.whl
fi
if [ -d /tmp/site ]; then
    export PYTHONPATH=$PWD:/tmp/site
fi
export MOETUNE_CACHE_DIR=$PWD/.autotune
mkdir -p "$MOETUNE_CACHE_DIR"
if [ ! -f "$MOETUNE_CACHE_DIR/autotune.json" ]; then
    if nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -q "H100"; then
        cp benchmarks/results/autotune-H100.json "$MOETUNE_CACHE_DIR/autotune.json"
    else
        python3 benchmarks/seed_autotune.py benchmarks/results/autotune-H100.json "$MOETUNE_CACHE_DIR/autotune.json"
    fi
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
