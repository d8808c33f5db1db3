#!/usr/bin/env bash
# The wheels that Unsloth 2026.10.9 needs on the GPU machine, into .whl/unsloth/ (ignored by git; name
# `.whl/unsloth` in the device tool's `carry`). Run here, where PyPI is reachable:
#
#     bash benchmarks/unsloth_wheels.sh
#
# The GPU machine (Python 3.12, x86-64, no network) already has torch 2.11 (cu130), triton 3.6,
# transformers 5.17, peft 0.21, accelerate, safetensors, tokenizers, sentencepiece, huggingface_hub,
# pyarrow, pandas, xxhash, fsspec, httpx, jinja2, rich: none of those travel (a second torch,
# transformers or peft would only shadow the machine's own). What `import unsloth` and
# FastModel.from_pretrained / get_peft_model actually import, and it lacks (read off unsloth's and
# unsloth_zoo's source, and traced through their GPU code path):
#   unsloth, unsloth_zoo  (unsloth requires unsloth_zoo>=2026.10.9, and caps transformers<=5.17.0)
#   trl                   (unsloth/trainer.py, import_fixes: imported and patched on import; <=1.15.0)
#   datasets, dill, multiprocess (unsloth_zoo/tokenizer_utils.py `import datasets` at module level)
#   bitsandbytes          (unsloth_zoo/patching_utils.py patch_model_and_tokenizer raises ImportError
#                          without `bitsandbytes.nn.Linear4bit`, even for 16-bit LoRA)
# Everything else unsloth lists is optional on this path (guarded imports): xformers (PyTorch SDPA is
# used instead), torchao (QAT / fp8 only), cut_cross_entropy (unsloth_zoo turns CCE off on torch>=2.8),
# hf_transfer (downloads), tyro, msgspec (vLLM), diffusers, pydantic (only silences a warning).
#
# Two wheels are slimmed after download, so that the whole carried tree stays under 64 MiB:
#   unsloth:      its `studio/` folder (Unsloth Studio, a web app: 82 MB of 88) is dropped; no module of
#                 the training path imports it.
#   bitsandbytes: only the CPU, CUDA 13.0 and 13.2 libraries are kept (torch 2.11+cu130 loads
#                 libbitsandbytes_cuda130.so); the CUDA 11/12, ROCm and XPU builds are dropped.
# Both keep their file names; their RECORD files are rewritten to match. The originals are checked
# against the sha256 below before anything is changed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${1:-.whl/unsloth}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

REQS=$(mktemp)
trap 'rm -f "$REQS"' EXIT
cat >"$REQS" <<'EOF'
unsloth==2026.10.9 --hash=sha256:feb40b99bc4f8c543a36cbd0fe6e1410d6e4ac16bd4d0c731f607adce3d63bb0
unsloth_zoo==2026.10.9 --hash=sha256:f68e0576b0e9bd2ef85f19bf665132c576b52ee4df923fbb16c81538a3cde676
trl==1.15.0 --hash=sha256:9c9a4b68a184a0b6425293e9b152950f817af686f3758f70191fff4ded1391c7
datasets==4.8.5 --hash=sha256:5079900781719c0e063a8efdd2cd95a31ad0c63209178669cd23cf1b926149ff
dill==0.4.1 --hash=sha256:1e1ce33e978ae97fcfcff5638477032b801c46c7c65cf717f95fbc2248f79a9d
multiprocess==0.70.19 --hash=sha256:3a56c0e85dd5025161bac5ce138dcac1e49174c7d8e74596537e729fd5c53c28
bitsandbytes==0.50.2 --hash=sha256:55348a9a4a21bfd99cf8c7b32fe67b4030ae5c2a05738e03c1747f65fa6ec283
EOF

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --require-hashes -r "$REQS" \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST"

"$PYTHON" - "$DEST" <<'EOF'
"""Drop members from two wheels (same file name, RECORD rewritten without them)."""
import glob, os, re, sys, zipfile

DROP = {
    "unsloth-": re.compile(r"^studio/"),
    "bitsandbytes-": re.compile(r"^bitsandbytes/libbitsandbytes_(?!cpu\.|cuda130\.|cuda132\.).*\.so$"),
}
dest = sys.argv[1]
for prefix, pattern in DROP.items():
    (path,) = glob.glob(os.path.join(dest, prefix + "[0-9]*.whl"))
    tmp = path + ".tmp"
    dropped = 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if pattern.search(info.filename):
                dropped += 1
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if not pattern.search(l.split(",", 1)[0])).encode()
            out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(tmp, path)
    print(f"slimmed {os.path.basename(path)}: {dropped} files dropped")
EOF

ls -l "$DEST"
du -cb "$DEST"/*.whl | awk 'END { printf "total: %.1f MiB in %d wheels\n", $1 / 1048576, NR - 1 }'
