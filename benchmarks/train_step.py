"""Whole-model training step: moetune (FastMoEModel) vs transformers + PEFT, same model, same LoRA targets.

    python benchmarks/train_step.py --model qwen3-30b-a3b --seq 4096             # all 48 layers
    python benchmarks/train_step.py --model qwen3-30b-a3b --layers 8 --seq 8192 16384

A step = forward + backward + AdamW step, batch 1, random tokens, LoRA r=16 (alpha 32) on q/k/v/o
and the experts, gradient checkpointing, bf16 weights, random initialisation on the GPU (nothing
is downloaded). Reported: median seconds per step after warm-up, tokens/s, and peak
torch.cuda.max_memory_allocated over the timed steps (weights included).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

# Published configs (config.json of each model), so the shapes are the real ones.
MODELS = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
}
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# --tiny: the same architecture at toy width, so the script itself can be checked on a CPU.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)


def make_config(name: str, layers: int | None, tiny: bool = False):
    import transformers

    kwargs = dict(MODELS[name])
    if tiny:
        kwargs.update({k: v for k, v in TINY.items() if k in kwargs})
    model_type = kwargs.pop("model_type")
    if layers:
        kwargs["num_hidden_layers"] = layers
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def build_moetune(config, rank, alpha, device):
    import moetune

    model, _ = moetune.FastMoEModel.from_pretrained(config, dtype=DTYPE[device.type], device_map=device)
    return moetune.FastMoEModel.get_peft_model(
        model, r=rank, lora_alpha=alpha, target_modules=(*LINEAR_TARGETS, "gate_up_proj", "down_proj"),
        use_gradient_checkpointing=True,
    )


def build_baseline(config, rank, alpha, device):
    import copy

    import transformers
    from peft import LoraConfig, get_peft_model

    config = copy.deepcopy(config)
    config._experts_implementation = "grouped_mm"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPE[device.type], attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=LINEAR_TARGETS,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    return get_peft_model(model, lora)


DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_step(model, optimizer, ids, device) -> None:
    """One more step under torch.profiler: where GPU time goes and how busy the host is."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60), flush=True)


def run(provider, config, seq, args, device) -> dict:
    torch.manual_seed(0)
    model = (build_moetune if provider == "moetune" else build_baseline)(config, args.rank, args.alpha, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=gen).to(device)
    times, losses = [], []
    try:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                _sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        if args.profile and provider == "moetune":
            profile_step(model, optimizer, ids, device)
        result = {
            "step_s": statistics.median(times),
            "tokens_per_s": seq / statistics.median(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "trainable_params": sum(p.numel() for p in params),
            "losses": losses,
        }
    except torch.OutOfMemoryError:
        result = {"oom": True}
    del model, optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=list(MODELS))
    parser.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    parser.add_argument("--seq", nargs="+", type=int, default=[4096])
    parser.add_argument("--providers", nargs="+", default=["moetune", "baseline"], choices=["moetune", "baseline"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="after timing, print the top kernels of one moetune step")
    parser.add_argument("--tiny", action="store_true", help="toy widths (runs on CPU, fp32): checks the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("needs a CUDA GPU (or --tiny)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = make_config(args.model, args.layers, args.tiny)
    env = harness.environment()
    rows = []
    print(f"# {env['device']}  torch {env['torch']}  transformers {env['transformers']}  peft {env['peft']}")
    for seq in args.seq:
        for provider in args.providers:
            result = run(provider, config, seq, args, device)
            rows.append({"model": args.model, "layers": config.num_hidden_layers, "seq": seq, "provider": provider, **result})
            if result.get("oom"):
                print(f"{args.model} x{config.num_hidden_layers} seq {seq} {provider}: out of memory", flush=True)
            else:
                print(
                    f"{args.model} x{config.num_hidden_layers} seq {seq} {provider}: {result['tokens_per_s']:.0f} tok/s, "
                    f"{result['step_s'] * 1e3:.0f} ms/step, peak {result['peak_gib'] or 0:.1f} GiB, "
                    f"{result['trainable_params'] / 1e6:.0f}M trainable, loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}",
                    flush=True,
                )
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"train-step-{'tiny-' if args.tiny else ''}{args.model}-{env['device'].replace(' ', '_')}.json")
    harness.write_json(out, {"environment": env, "args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
