"""Whole-model training step under Unsloth: the peer side of benchmarks/train_step.py, same model, same timing.

    bash benchmarks/unsloth_wheels.sh          # here, once: the wheels into .whl/unsloth/ (carry `.whl/unsloth`)
    python benchmarks/unsloth_step.py --checkpoint /tmp/qwen3-30b-a3b-x8 --seq 4096 8192 16384 32768

The model is a random-initialised Qwen3-30B-A3B-shaped checkpoint cut to --layers layers (full
vocabulary) loaded from disk; if --checkpoint does not exist it is made first (random init on the
GPU, `save_pretrained`, plus a tiny word-level tokenizer, since Unsloth's loader insists on one),
in a child process so that transformers is not imported before Unsloth. A checkpoint that
`train_step.py --checkpoint` made (no tokenizer) gets the tokenizer added, so both scripts can
train the same weights.

Unsloth's own path: `FastModel.from_pretrained` (what `FastLanguageModel` delegates qwen3_moe to),
16-bit LoRA, then `FastModel.get_peft_model` with r=16, alpha 32 and the target list of its
notebooks (q/k/v/o + gate/up/down, which Unsloth maps onto the fused experts' `gate_up_proj` and
`down_proj` through PEFT `target_parameters`), gradient checkpointing "unsloth", bf16. The MoE
backend is Unsloth's default (grouped_mm where torch has it; UNSLOTH_MOE_BACKEND overrides).

A step and its measurement are train_step.py's `run()`: batch 1, random token ids, forward with
labels + backward + AdamW(lr 1e-4) over the trainable parameters; median seconds per step after
warm-up, tokens/s, peak torch.cuda.max_memory_allocated over the timed steps (weights included),
trainable parameter count, losses; out of memory is caught per sequence length.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# What the notebooks of Unsloth pass for a MoE model; gate/up/down reach the experts' fused Parameters.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The same experts written the explicit way (--targets explicit): PEFT target_parameters, as train_step.py's baseline.
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Set (unless already set) before unsloth is imported. The GPU machine has no network: nothing may try
# the Hub, and Unsloth's statistics download stays off (unsloth/models/_utils.py get_statistics and
# has_internet read these). The rest keep its compile cache out of the repo (unsloth_zoo/compiler.py
# defaults to ./unsloth_compiled_cache) and its Inductor workers at their default count
# (unsloth/_gpu_init.py drops them to 1 when NVIDIA_VISIBLE_DEVICES pins a GPU and CUDA_VISIBLE_DEVICES
# is unset, as in a container): compile time only, steps are timed after warm-up either way.
UNSLOTH_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache",
    "UNSLOTH_FORCE_SINGLE_COMPILE_WORKER": "0",
}
# Tokenizer of the random checkpoint: a few special tokens and words, ids far below the model's vocab.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="saved checkpoint folder; made (random init) if missing")
    parser.add_argument("--model", default="qwen3-30b-a3b", help="shape of the checkpoint to make (train_step.MODELS)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the checkpoint to make")
    parser.add_argument("--seq", nargs="+", type=int, default=[4096])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--targets", choices=["notebook", "explicit"], default="notebook",
                        help="notebook: target_modules q/k/v/o + gate/up/down (Unsloth maps them onto the experts); "
                             "explicit: q/k/v/o + target_parameters mlp.experts.gate_up_proj/down_proj")
    parser.add_argument("--gradient-checkpointing", choices=["unsloth", "off"], default="unsloth",
                        help="Unsloth's offloaded checkpointing (its default), or none")
    parser.add_argument("--out", default=None, help="JSON, rewritten after each sequence length")
    parser.add_argument("--tiny", action="store_true", help="toy widths for a made checkpoint (checks the script)")
    parser.add_argument("--create-only", action="store_true",
                        help="make the checkpoint (or add the tokenizer to one without), then stop (no Unsloth)")
    return parser.parse_args(argv)


# --- the checkpoint: no Unsloth here ----------------------------------------------------------------------


def make_tokenizer(words: int = 61):
    """A word-level tokenizer of len(SPECIAL_TOKENS) + words entries, made locally (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": len(SPECIAL_TOKENS) + i for i in range(words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        model_max_length=131072,
    )


def create_checkpoint(path: str, model: str = "qwen3-30b-a3b", layers: int = 8, tiny: bool = False, device=None) -> str:
    """Random-initialised `model` shape cut to `layers` layers (full vocabulary unless tiny), saved at `path`.

    Built by train_step.save_checkpoint (on the GPU in bf16 when there is one, fp32 on a CPU), with
    make_tokenizer() beside it. Written to a temporary folder first, so a killed run leaves no half one.
    """
    import shutil

    import torch
    import train_step

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = train_step.make_config(model, layers, tiny)
    tokenizer = make_tokenizer()
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    torch.manual_seed(0)
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    train_step.save_checkpoint(config, tmp, device)
    tokenizer.save_pretrained(tmp)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    os.replace(tmp, path)
    return path


def has_tokenizer(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def add_tokenizer(path: str) -> None:
    """make_tokenizer() into an existing checkpoint that has none (one that train_step.py --checkpoint made)."""
    make_tokenizer().save_pretrained(path)


def ensure_checkpoint(args) -> int:
    """Make --checkpoint (or add its tokenizer) in a child process, so this process imports Unsloth first.

    Returns the child's exit status (0 when the checkpoint was ready already).
    """
    if os.path.isdir(args.checkpoint) and has_tokenizer(args.checkpoint):
        return 0
    cmd = [sys.executable, os.path.abspath(__file__), "--create-only", "--checkpoint", args.checkpoint,
           "--model", args.model, "--layers", str(args.layers)] + (["--tiny"] if args.tiny else [])
    what = "a tokenizer for" if os.path.isdir(args.checkpoint) else f"{args.model} x{args.layers}, random init, at"
    print(f"# making {what} {args.checkpoint}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, check=False).returncode
    if rc == 0:
        print(f"# made in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


# --- Unsloth -------------------------------------------------------------------------------------------


def lora_targets(model) -> list[str]:
    """Where LoRA factors sit, layer index folded: e.g. 'self_attn.q_proj', 'mlp.experts'."""
    found = set()
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_" in name:
            where = name.split(".lora_")[0]
            where = re.sub(r"^.*?layers\.\d+\.", "", where)
            found.add(re.sub(r"(\.base_layer)+$", "", where))
    return sorted(found)


def expected_trainable_params(config: dict, rank: int) -> int:
    """LoRA parameters of rank `rank` on q/k/v/o and on every expert's gate_up and down, all layers.

    Per layer: r * (in + out) for each attention projection, r * E * (H + 2I) for gate_up and
    r * E * (I + H) for down. Qwen3-30B-A3B x8 at r=16: 107,085,824.
    """
    H, E, I = config["hidden_size"], config.get("num_experts") or config["num_local_experts"], config["moe_intermediate_size"]
    head_dim = config.get("head_dim") or H // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    attention = (H + q) + 2 * (H + kv) + (q + H)
    experts = E * (H + 2 * I) + E * (I + H)
    return rank * (attention + experts) * config["num_hidden_layers"]


def build_unsloth(checkpoint: str, seq: int, rank: int, alpha: float, targets: str = "notebook",
                  checkpointing: str = "unsloth"):
    """Unsloth's own loading and LoRA: FastModel (FastLanguageModel hands qwen3_moe to it), 16-bit, "unsloth"
    (offloaded) checkpointing, or none with checkpointing="off"."""
    import torch
    from unsloth import FastModel

    use_checkpointing = {"unsloth": "unsloth", "off": False}[checkpointing]
    model, _tokenizer = FastModel.from_pretrained(
        model_name=checkpoint, max_seq_length=seq, dtype=torch.bfloat16,
        load_in_4bit=False, load_in_8bit=False, load_in_16bit=True, full_finetuning=False,
        use_gradient_checkpointing=use_checkpointing, local_files_only=True,
    )
    lora = {"target_modules": TARGET_MODULES}
    if targets == "explicit":
        lora = {"target_modules": TARGET_MODULES[:4], "target_parameters": EXPERT_PARAMETERS}
    return FastModel.get_peft_model(
        model, r=rank, lora_alpha=alpha, lora_dropout=0, bias="none", **lora,
        use_gradient_checkpointing=use_checkpointing, random_state=3407, max_seq_length=seq,
    )


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def run(checkpoint: str, vocab_size: int, seq: int, args) -> dict:
    """train_step.run() with the model built by Unsloth: same seeds, ids, loop, timing and peak memory."""
    import torch
    import train_step

    device = torch.device("cuda")
    torch.manual_seed(0)
    t_build = time.perf_counter()
    model = build_unsloth(checkpoint, seq, args.rank, args.alpha, args.targets, args.gradient_checkpointing)
    build_s = time.perf_counter() - t_build
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    targets = lora_targets(model)
    # The optimizer moetune and the baseline get (fused AdamW; torch's default foreach one takes ~4 bytes a parameter
    # more at its step and more time: run 57's Unsloth ran that, helper 64)
    optimizer = train_step.make_optimizer(params, "adamw")
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab_size, (1, seq), generator=gen).to(device)
    try:
        times, losses, warmup_s, _ = train_step.time_steps(model, optimizer, ids, args.warmup, args.steps, device)
        result = {
            "step_s": statistics.median(times),
            "tokens_per_s": seq / statistics.median(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "trainable_params": sum(p.numel() for p in params),
            "losses": losses,
            "lora_targets": targets,
            "build_s": build_s,
            "warmup_s": warmup_s,
        }
    except Exception as error:  # only out-of-memory is a result; anything else re-raises
        if not _is_oom(error):
            raise
        result = {"oom": True, "build_s": build_s}
    del model, optimizer, params
    gc.collect()
    torch.cuda.empty_cache()
    return result


def moe_backend() -> str | None:
    try:
        from unsloth_zoo.temporary_patches.moe_utils import select_moe_backend

        return select_moe_backend()
    except Exception:  # noqa: BLE001 - informational only
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.create_only:
        if os.path.isdir(args.checkpoint):
            if not has_tokenizer(args.checkpoint):
                add_tokenizer(args.checkpoint)
            return 0
        import torch

        if not (args.tiny or torch.cuda.is_available()):
            print("a full-size checkpoint is made on a CUDA GPU (or use --tiny)", file=sys.stderr)
            return 2
        create_checkpoint(args.checkpoint, args.model, args.layers, args.tiny)
        return 0
    for key, value in UNSLOTH_ENV.items():
        os.environ.setdefault(key, value)
    rc = ensure_checkpoint(args)  # refuses to make a full-size one without a GPU
    if rc:
        return rc

    # Unsloth before anything touches CUDA or imports transformers, peft or trl: it patches them on
    # import, and unsloth_zoo sets PYTORCH_ALLOC_CONF (expandable_segments) before the first allocation.
    # A bare `import torch` may come first (unsloth/_gpu_init.py imports torch itself before that).
    import torch
    import unsloth
    import unsloth_zoo

    if not torch.cuda.is_available():
        print("needs a CUDA GPU (--create-only --tiny makes a toy checkpoint on a CPU)", file=sys.stderr)
        return 2

    with open(os.path.join(args.checkpoint, "config.json")) as f:
        config = json.load(f)
    import harness  # after unsloth: its environment() imports transformers and peft
    import train_step

    env = harness.environment()
    env["alloc_conf"] = {name: os.environ.get(name) for name in train_step.ALLOC_CONF_VARS}  # unsloth_zoo's setting
    env["unsloth"] = unsloth.__version__
    env["unsloth_zoo"] = getattr(unsloth_zoo, "__version__", None)
    rows = []
    expected = expected_trainable_params(config, args.rank)
    out = args.out or os.path.join(HERE, "results", f"unsloth-step-{args.model}-{env['device'].replace(' ', '_')}.json")
    print(f"# {env['device']}  torch {env['torch']}  transformers {env['transformers']}  peft {env['peft']}  "
          f"unsloth {env['unsloth']}  unsloth_zoo {env['unsloth_zoo']}", flush=True)
    name, layers = args.model, config["num_hidden_layers"]
    for seq in args.seq:
        result = run(args.checkpoint, config["vocab_size"], seq, args)
        backend = moe_backend()
        rows.append({"model": name, "layers": layers, "seq": seq, "provider": "unsloth", "moe_backend": backend,
                     "gradient_checkpointing": args.gradient_checkpointing, **result})
        if result.get("oom"):
            print(f"{name} x{layers} seq {seq} unsloth: out of memory", flush=True)
        else:
            print(
                f"{name} x{layers} seq {seq} unsloth: {result['tokens_per_s']:.0f} tok/s, "
                f"{result['step_s'] * 1e3:.0f} ms/step, peak {result['peak_gib']:.1f} GiB, "
                f"{result['trainable_params'] / 1e6:.0f}M trainable, loss {result['losses'][0]:.3f} -> "
                f"{result['losses'][-1]:.3f}  (MoE backend {backend}; LoRA on {', '.join(result['lora_targets'])}; "
                f"load {result['build_s']:.0f} s, warm-up {result['warmup_s']:.0f} s)",
                flush=True,
            )
            if result["trainable_params"] != expected:
                print(f"# note: {result['trainable_params']:,} trainable, not the {expected:,} of rank {args.rank} "
                      f"on q/k/v/o + experts", flush=True)
        # After each length, so that a run cut short keeps what it measured.
        harness.write_json(out, {"environment": env, "args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
