"""Sibling LoRA projections on one input, grouped (moetune/lora_groups.py) against one Function a layer.

An attention module's q/k/v projections (MLA: q_a and kv_a) with peft LoRA on a bf16 base and fp32 factors, as
FastMoEModel installs them, at real widths: forward and backward of the three layers, the two ways alternating in
rounds in one process (outputs and gradients checked to agree first). Reports each way's "ms" (a step alone, synced),
"queued_ms" (steps back to back: GPU time where the host keeps ahead), "host_ms" (the host's time to issue a step).

    python benchmarks/lora_groups_ab.py                                   # Qwen3, gpt-oss and GLM shapes at 8K
    python benchmarks/lora_groups_ab.py --cases qwen3-30b-a3b:8192 --rounds 5 --out results/x.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

from moetune import lora_groups, lora_linear  # noqa: E402

# model -> (hidden width, ((name, out width, bias), ...)) of the projections that read the hidden states
PROJECTIONS = {
    "qwen3-30b-a3b": (2048, (("q_proj", 4096, False), ("k_proj", 512, False), ("v_proj", 512, False))),
    "gpt-oss-20b": (2880, (("q_proj", 4096, True), ("k_proj", 512, True), ("v_proj", 512, True))),
    "glm-4.7-flash": (2048, (("q_a_proj", 768, False), ("kv_a_proj_with_mqa", 576, False))),
}


class _Projections(nn.Module):
    def __init__(self, width: int, members, dtype, device):
        super().__init__()
        self.names = [name for name, _, _ in members]
        for name, out, bias in members:
            setattr(self, name, nn.Linear(width, out, bias=bias, dtype=dtype, device=device))

    def forward(self, x):
        return [getattr(self, name)(x) for name in self.names]


def build(model: str, rank: int, dtype, device):
    width, members = PROJECTIONS[model]
    return build_projections(width, members, rank, dtype, device), width


def build_projections(width: int, members, rank: int, dtype, device) -> nn.Module:
    """Linear layers (name, out width, bias) on one input of this width, with peft LoRA (fp32 factors on the base's
    dtype) through moetune's fast path."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    module = _Projections(width, members, dtype, device)
    module = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=module.names), module)
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # peft's fp32 adapters on a bf16 base
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
        p.requires_grad_("lora_" in name)
    assert lora_linear.install_fast_lora_linear(module) == len(members)
    return module


def set_grouped(module: nn.Module, grouped: bool) -> None:
    if grouped:
        assert lora_groups.form_groups(module) == 1
    else:
        lora_groups.ungroup(module)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=[f"{m}:8192" for m in PROJECTIONS], metavar="MODEL:TOKENS")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON results path")
    args = parser.parse_args(argv)
    # A hand-over the group refuses computes alone, agrees, and would be timed as "grouped": make it an error.
    warnings.filterwarnings("error", message="moetune: the LoRA layers")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = []
    for text in args.cases:
        model, _, tokens = text.partition(":")
        if model not in PROJECTIONS or not tokens.isdigit() or int(tokens) < 1:
            parser.error(f"--cases: expected MODEL:TOKENS with MODEL one of {', '.join(PROJECTIONS)}, got {text!r}")
        cases.append((model, int(tokens)))

    rows = []
    for model, tokens in cases:
        module, width = build(model, args.rank, dtype, device)
        x = torch.randn(1, tokens, width, dtype=dtype, device=device, requires_grad=True)
        dys = [torch.randn(1, tokens, out, dtype=dtype, device=device) for _, out, _ in PROJECTIONS[model][1]]
        params = [x] + [p for p in module.parameters() if p.requires_grad]

        def step(module=module, x=x, dys=dys):
            torch.autograd.backward(module(x), dys)

        results = {}
        for grouped in (True, False):
            set_grouped(module, grouped)
            outputs = module(x)
            results[grouped] = [t.detach() for t in outputs] + list(torch.autograd.grad(outputs, params, dys))
        error = max(harness.relative_error(a, b) for a, b in zip(results[True], results[False]))
        timings = {True: [], False: []}
        for index in range(args.rounds):
            for grouped in ((True, False) if index % 2 == 0 else (False, True)):
                set_grouped(module, grouped)
                timings[grouped].append(harness.measure(step, device, args.warmup, args.repeat))
                for p in params:
                    p.grad = None
        row = {"model": model, "tokens": tokens, "rank": args.rank, "max_relative_error": error}
        for grouped, label in ((True, "grouped"), (False, "alone")):
            for key in timings[grouped][0]:
                row[f"{label}_{key}"] = statistics.median(t[key] for t in timings[grouped])
        rows.append(row)
        keys = [k for k in ("ms", "queued_ms", "host_ms") if f"grouped_{k}" in row]
        print(f"{model} {tokens}: error {error:.1e}; " + "; ".join(
            f"{k} grouped {row[f'grouped_{k}']:.3f} / alone {row[f'alone_{k}']:.3f}" for k in keys), flush=True)
    if args.out:
        harness.write_json(args.out, {"environment": harness.environment(), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
