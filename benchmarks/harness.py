"""Shared benchmark harness: real MoE shapes, the transformers+PEFT baseline, timing, memory, JSON rows.

The baseline is the model's own transformers v5 experts module with
`config._experts_implementation = "grouped_mm"`, wrapped by PEFT LoRA through
`target_parameters` (the delta `B @ A` is formed for every expert on each forward). Its LoRA factors are in the
experts' dtype (bf16), as are moetune's here: inject_adapter_in_model keeps them so, where peft.get_peft_model (what
a user calls) would upcast them to fp32 and compute the delta in fp32, slower. The block ratios are conservative so.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import moetune
from moetune.experts import ExpertLoRA


@dataclass(frozen=True)
class MoEShape:
    """One experts block of a real model (dimensions from its published config)."""

    name: str
    model_type: str
    config_class: str
    config_kwargs: dict
    experts_class: str
    E: int
    k: int
    H: int
    I: int
    activation: str = "swiglu"
    interleaved: bool = False
    transposed: bool = False  # gate_up stored [E, H, 2I] (gpt-oss)
    bias: bool = False


SHAPES = {
    "qwen3-30b-a3b": MoEShape(
        "qwen3-30b-a3b", "qwen3_moe", "Qwen3MoeConfig",
        dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
        "Qwen3MoeExperts", E=128, k=8, H=2048, I=768,
    ),
    "gpt-oss-20b": MoEShape(
        "gpt-oss-20b", "gpt_oss", "GptOssConfig",
        dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4),
        "GptOssExperts", E=32, k=4, H=2880, I=2880,
        activation="gpt_oss", interleaved=True, transposed=True, bias=True,
    ),
    "glm-4.7-flash": MoEShape(
        "glm-4.7-flash", "glm4_moe_lite", "Glm4MoeLiteConfig",
        dict(hidden_size=2048, moe_intermediate_size=1536, n_routed_experts=64, num_experts_per_tok=4),
        "Glm4MoeLiteExperts", E=64, k=4, H=2048, I=1536,
    ),
}


def parse_gpu_args(parser, argv=None):
    """Adds --tiny (toy sizes on CPU through the Triton interpreter) and --out, parses; without --tiny a CUDA GPU is
    needed (the parser's one-line error otherwise)."""
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU through the Triton interpreter")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny)")
    return args


def parse_cases(parser, cases: list[str], option: str = "--cases") -> list[tuple[str, int]]:
    """[(shape name, tokens)] from SHAPE:TOKENS strings; a bad one is the parser's one-line error."""
    parsed = []
    for case in cases:
        name, _, tokens = case.partition(":")
        if name not in SHAPES or not tokens.isdigit():
            parser.error(f"{option}: expected SHAPE:TOKENS with SHAPE one of {sorted(SHAPES)}, got {case!r}")
        parsed.append((name, int(tokens)))
    return parsed


def base_gemm_flops(shape: MoEShape, tokens: int) -> float:
    """Forward + input-gradient GEMMs of the frozen base: 2 * (2I*H + H*I) per row, each twice."""
    return 4.0 * tokens * shape.k * 3 * shape.H * shape.I


# --- the baseline: transformers experts + PEFT target_parameters ------------------------------------


def make_experts_module(shape: MoEShape, dtype, device, implementation: str = "grouped_mm") -> nn.Module:
    """The model's own experts module from transformers, random weights, frozen."""
    models = importlib.import_module(f"transformers.models.{shape.model_type}")
    config = getattr(models, shape.config_class)(**shape.config_kwargs)
    config._experts_implementation = implementation
    modeling = importlib.import_module(f"transformers.models.{shape.model_type}.modeling_{shape.model_type}")
    with torch.device(device):
        experts = getattr(modeling, shape.experts_class)(config).to(dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, p in experts.named_parameters():
        fan_in = p.shape[-1] if not (shape.transposed and p.dim() == 3) else p.shape[-2]
        scale = 0.5 if "bias" in name else fan_in**-0.5
        p.data.copy_((torch.randn(p.shape, generator=gen) * scale).to(dtype))
        p.requires_grad_(False)
    return experts


class _Holder(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts


def add_peft_lora(experts: nn.Module, rank: int, alpha: float, seed: int = 0) -> tuple[nn.Module, list[nn.Parameter]]:
    """PEFT LoRA on gate_up_proj and down_proj via target_parameters; B made non-zero so LoRA matters."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    holder = inject_adapter_in_model(config, _Holder(experts))
    params = [p for n, p in holder.named_parameters() if "lora_" in n]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for n, p in holder.named_parameters():
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)
    return holder.experts, params


def peft_lora_to_expert_lora(peft_experts: nn.Module, shape: MoEShape) -> ExpertLoRA:
    """Read PEFT's target_parameters factors into moetune's layout (shares no storage with PEFT).

    The layout conversion is moetune.adapters.expert_factors_from_peft (the one place that knows it).
    """
    from moetune.adapters import expert_factors_from_peft

    factors = {}
    module = peft_experts
    while hasattr(module, "parameter_name"):  # nested ParamWrappers, one per targeted parameter
        A, B = expert_factors_from_peft(
            module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach(), shape.E
        )
        factors[module.parameter_name] = (A.requires_grad_(), B.requires_grad_(), module.scaling["default"])
        module = module.base_layer
    A1, B1, s = factors["gate_up_proj"]
    A2, B2, _ = factors["down_proj"]
    return ExpertLoRA(A1, B1, A2, B2, scaling=s)


def base_weights(experts: nn.Module, shape: MoEShape):
    """(gate_up [E, 2I, H] view, down [E, H, I] view, biases) of a transformers experts module."""
    module = experts
    while hasattr(module, "base_layer"):
        module = module.base_layer
    gate_up, down = module.gate_up_proj, module.down_proj
    if shape.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    b1 = getattr(module, "gate_up_proj_bias", None)
    b2 = getattr(module, "down_proj_bias", None)
    return gate_up, down, b1, b2


def make_routing(shape: MoEShape, tokens: int, device, dtype, seed: int = 0):
    """Random router logits -> softmax -> top-k -> renormalise: balanced on average, like a random router."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(tokens, shape.E, generator=gen)
    weights, ids = logits.softmax(-1).topk(shape.k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return ids.to(device), weights.to(device=device, dtype=dtype)


def routed_operands(shape: MoEShape, tokens: int, device, dtype):
    """(rand, plan, w_S) for kernel benchmarks: rand(*size, scale=0.02) draws from one CPU generator seeded 0 (the
    same operands on every run), the routing plan of make_routing's ids, and its weights in sorted-row order."""
    from moetune.experts.routing import plan_routing

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=0.02):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    ids, weights = make_routing(shape, tokens, device, dtype)
    plan = plan_routing(ids, shape.E)
    return rand, plan, weights.reshape(-1).index_select(0, plan.perm_S)


# --- timing and memory ---------------------------------------------------------------------------------


# Rounds of steps queued back to back for measure()'s "queued_ms".
QUEUED_ROUNDS = 3


def measure(step, device, warmup: int, repeat: int) -> dict:
    """Median / p20 / p80 milliseconds of `step()`, the host time to issue it, and its peak memory above what was
    allocated before.

    "ms" times each step alone: it starts on an idle GPU, synchronised after the previous step, so it includes the
    GPU's wait for the host's first launches (routing, checks: ~0.3-0.5 ms on a busy host). On CUDA, "queued_ms" is
    the GPU time a step takes when the host queues steps back to back, as the layers of a model are (median of
    QUEUED_ROUNDS rounds of `repeat` steps timed behind one untimed step, one sync per round): the step's own GPU
    time where the host keeps ahead, its host time where it does not."""
    for _ in range(warmup):  # includes one-time work (autotuning: do_bench's 256 MiB L2-flush buffer)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()  # steady-state peak of a step, after warm-up
    times, host = [], []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            step()
            end.record()
            host.append((time.perf_counter() - t0) * 1e3)  # host time to issue the step: ~ms when host-bound
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    result = {
        "ms": statistics.median(times),
        "ms_p20": times[int(0.2 * (len(times) - 1))],
        "ms_p80": times[int(0.8 * (len(times) - 1))],
    }
    if device.type == "cuda":
        result["host_ms"] = statistics.median(host)
        result["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
        result["queued_ms"] = queued_ms(step, repeat)
    return result


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius), in float64; b = 0 counts as a norm of 1e-30."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def queued_ms(step, repeat: int, rounds: int = QUEUED_ROUNDS) -> float:
    """Median over rounds of the GPU milliseconds per step of `repeat` steps issued back to back (CUDA), timed behind
    one untimed step so that the timed ones start on a GPU that is not waiting for its host."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        step()
        start.record()
        for _ in range(repeat):
            step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeat)
    return statistics.median(times)


def environment() -> dict:
    import peft
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "moetune": moetune.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        env["commit"] = subprocess.run(
            # "-dirty" where the files differ from HEAD (the device copy of a working tree carries an older HEAD)
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True, cwd=here,
        ).stdout.strip()
        if env["commit"].endswith("-dirty"):  # which changes: the diff's hash (the same tree gives the same hash)
            diff = subprocess.run(["git", "diff", "HEAD"], capture_output=True, check=True, cwd=here).stdout
            env["diff_sha1"] = hashlib.sha1(diff).hexdigest()
    except (OSError, subprocess.CalledProcessError):
        pass
    env.update(machine())
    return env


def machine() -> dict:
    """What else moves a timing from one machine to the next: the driver and CUDA runtime, the GPU's clocks and power
    limit now (a clock drop from 1980 to ~1755 MHz explained a slow run), the host's CPU (steps wait on slow hosts)."""
    info = {"cuda_runtime": torch.version.cuda, "host_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["host_cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        fields = ("driver_version", "clocks.sm", "clocks.max.sm", "power.limit", "temperature.gpu")
        try:
            out = subprocess.run(
                ["nvidia-smi", f"--id={torch.cuda.current_device()}", f"--query-gpu={','.join(fields)}",
                 "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True, timeout=20,
            ).stdout.strip()
            info.update(zip(("driver", "sm_clock_mhz", "sm_clock_max_mhz", "power_limit_w", "temperature_c"),
                            (v.strip() for v in out.split(","))))
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def shape_dict(shape: MoEShape) -> dict:
    d = asdict(shape)
    d.pop("config_kwargs")
    return d
