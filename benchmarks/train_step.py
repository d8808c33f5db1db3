"""Whole-model training step: moetune (FastMoEModel) vs transformers + PEFT, same model, same LoRA targets.

    python benchmarks/train_step.py --model qwen3-30b-a3b --seq 4096             # all 48 layers
    python benchmarks/train_step.py --model qwen3-30b-a3b --layers 8 --seq 8192 16384

A step = forward + backward + optimizer step (AdamW; --optim adamw_bf16 / adamw_8bit: bf16 / 8-bit states), batch 1,
random tokens, LoRA r=16 (alpha 32) on q/k/v/o and the experts, gradient checkpointing, bf16 weights.
Weights: random initialisation on the GPU, or with --checkpoint a random-initialised checkpoint saved once
and loaded from disk by every provider (nothing is downloaded). Both providers get the same base weights
and data; their LoRA factors are drawn separately (B = 0, so both start from the same function).
Reported: median seconds per step after warm-up, tokens/s, and peak torch.cuda.max_memory_allocated over
the timed steps (weights included).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

from moetune.training.config import layers_or_auto  # noqa: E402
from moetune.training.loop import collector_frozen  # noqa: E402

# Published configs (config.json of each model), so the shapes are the real ones.
MODELS = {
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "gpt-oss-20b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, attention_bias=True, swiglu_limit=7.0, rope_theta=150000.0, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "truncate": False, "original_max_position_embeddings": 4096},
    ),
    "glm-4.7-flash": dict(
        model_type="glm4_moe_lite", vocab_size=154880, hidden_size=2048, intermediate_size=10240,
        moe_intermediate_size=1536, num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1,
        q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256,
        routed_scaling_factor=1.8, norm_topk_prob=True, n_group=1, topk_group=1, rope_theta=1000000.0,
        rms_norm_eps=1e-5, max_position_embeddings=202752, tie_word_embeddings=False,
    ),
}
# LoRA on the attention projections ("q/k/v/o"); GLM's multi-head latent attention names them differently.
LINEAR_TARGETS = {
    "qwen3-30b-a3b": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt-oss-20b": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "glm-4.7-flash": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}
# --tiny: the same architecture at toy width, so the script itself can be checked on a CPU.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_local_experts=8,
            n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16)


def make_config(name: str, layers: int | None, tiny: bool = False):
    import transformers

    kwargs = dict(MODELS[name])
    if tiny:
        kwargs.update({k: v for k, v in TINY.items() if k in kwargs})
        if kwargs["model_type"] == "glm4_moe_lite":  # latent attention: as many key/value heads as query heads
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    model_type = kwargs.pop("model_type")
    if layers:
        kwargs["num_hidden_layers"] = layers
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def baseline_attention(config) -> str:
    """sdpa, except where the model needs attention sinks (gpt-oss): flex attention on CUDA, eager on CPU."""
    if config.model_type != "gpt_oss":
        return "sdpa"
    return "flex_attention" if torch.cuda.is_available() else "eager"


def save_checkpoint(config, path: str, device) -> None:
    """A random-initialised checkpoint on disk (built on the device: a CPU init of 30B weights takes minutes)."""
    import transformers

    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPE[device.type])
    model.save_pretrained(path)
    del model


def build_moetune(source, name, rank, alpha, device, offload=None, fused_rotary=True, checkpoint_layers=None,
                  fused_router=True, lora_groups=True, fused_sinks=True):
    import moetune

    if not fused_sinks:  # a process-wide wrap: an earlier model of this process may have made it
        from moetune.models.fast_sinks import uninstall_fast_sinks

        uninstall_fast_sinks()
    model, _ = moetune.FastMoEModel.from_pretrained(
        source, dtype=DTYPE[device.type], device_map=device, fused_rotary=fused_rotary, fused_router=fused_router,
        fused_sinks=fused_sinks,
    )
    return moetune.FastMoEModel.get_peft_model(
        model, r=rank, lora_alpha=alpha, target_modules=(*LINEAR_TARGETS[name], "gate_up_proj", "down_proj"),
        use_gradient_checkpointing=True, offload_checkpoints=offload, checkpoint_layers=checkpoint_layers,
        lora_groups=lora_groups,
    )


def build_baseline(source, name, rank, alpha, device):
    import copy

    import transformers
    from peft import LoraConfig, get_peft_model

    dtype = DTYPE[device.type]
    if isinstance(source, str):
        config = transformers.AutoConfig.from_pretrained(source)
        config._experts_implementation = "grouped_mm"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, device_map=device, attn_implementation=baseline_attention(config),
        )
    else:
        config = copy.deepcopy(source)
        config._experts_implementation = "grouped_mm"
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=baseline_attention(config)
            )
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=LINEAR_TARGETS[name],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    return get_peft_model(model, lora)


DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# Kernel-name patterns -> the part of the model they belong to (first match wins).
KERNEL_GROUPS = (
    ("experts (moetune triton)", r"grouped_gemm|grouped_wgrad|_act_"),
    ("attention", r"flash|fmha|attention|flex"),
    ("rotary (moetune)", r"rotary_kernel"),
    ("cross-entropy / softmax", r"softmax|nll|cross_entropy|log_softmax|logsumexp"),
    ("GEMM (dense, grouped_mm)", r"gemm|gemv|cutlass|nvjet|xmma|sm90|sm80|grouped_mm"),
    ("copies, casts, gathers", r"copy|cast|index|gather|scatter|cat|fill"),
    ("elementwise / reductions", r"elementwise|vectorized|reduce|norm|mul|add|pow|rsqrt|silu|sigmoid"),
)


def training_step(model, optimizer, ids) -> torch.Tensor:
    """One step as every provider runs it: forward with labels, backward, optimizer step, gradients dropped. Returns
    the loss detached (not read here: no sync), as Trainer's training_step does: the loss itself would keep this
    step's autograd graph, and whatever its nodes hold, alive through the next step (NOTES session 27)."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def profile_step(model, optimizer, ids, device, rows: int = 40) -> dict:
    """One more step under torch.profiler: GPU time per kernel group, the top kernels, and host vs GPU time."""
    import re

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        training_step(model, optimizer, ids)
        _sync(device)
    wall = time.perf_counter() - t0
    kernels = [
        (e.key, e.count, e.self_device_time_total / 1e3)
        for e in prof.key_averages()
        if getattr(e, "self_device_time_total", 0) > 0 and not e.key.startswith(("aten::", "autograd::"))
    ]
    kernels.sort(key=lambda k: -k[2])
    groups: dict[str, float] = {}
    for name, _, ms in kernels:
        group = next((g for g, pattern in KERNEL_GROUPS if re.search(pattern, name, re.I)), "other")
        groups[group] = groups.get(group, 0.0) + ms
    busy = sum(ms for _, _, ms in kernels)
    print(f"profiled step: wall {wall * 1e3:.0f} ms (under the profiler), GPU busy {busy:.0f} ms, "
          f"{sum(c for _, c, _ in kernels)} kernel launches", flush=True)
    for group, ms in sorted(groups.items(), key=lambda g: -g[1]):
        print(f"  {group:28s} {ms:8.1f} ms  {100 * ms / max(busy, 1e-9):5.1f}%")
    for name, count, ms in kernels[:rows]:
        print(f"  {ms:8.2f} ms {count:6d}x  {name[:110]}")
    # CUDA runtime calls by the host time spent in them: a synchronize or a blocking copy here is the host waiting
    # for the GPU, so it cannot queue ahead.
    runtime = [(e.key, e.count, e.cpu_time_total / 1e3) for e in prof.key_averages()
               if e.key.startswith(("cuda", "cu")) and e.cpu_time_total > 0]
    runtime.sort(key=lambda r: -r[2])
    print("  CUDA runtime calls by host time:")
    for name, count, ms in runtime[:8]:
        print(f"  {ms:8.2f} ms {count:6d}x  {name}")
    # The torch ops that launched the time, by input shapes: which tensors the copies and elementwise kernels touch.
    ops = [
        (e.key, str(e.input_shapes)[:160], e.count, e.self_device_time_total / 1e3)
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key.startswith("aten::") and getattr(e, "self_device_time_total", 0) > 0
    ]
    ops.sort(key=lambda o: -o[3])
    print("  top torch ops by their own GPU time (input shapes):")
    for name, shapes, count, ms in ops[:2 * rows]:
        print(f"  {ms:8.2f} ms {count:6d}x  {name:32s} {shapes}")
    return {"wall_ms": wall * 1e3, "gpu_busy_ms": busy, "groups_ms": groups,
            "top_kernels": [{"name": n, "count": c, "ms": ms} for n, c, ms in kernels[:rows]],
            "runtime_calls": [{"name": n, "count": c, "host_ms": ms} for n, c, ms in runtime[:8]],
            "top_ops": [{"name": n, "input_shapes": sh, "count": c, "ms": ms} for n, sh, c, ms in ops[:2 * rows]]}


def memory_peak_step(model, optimizer, ids, provider: str, seq: int, args) -> dict:
    """One more step under the allocator's history: what is alive at its memory peak (memory_peak.py); the raw
    snapshot goes next to --out (for pytorch.org/memory_viz)."""
    import memory_peak

    start = memory_peak.requested_bytes()
    save = f"{os.path.splitext(args.out)[0]}-{provider}-{seq}-memory.pickle" if args.out else None
    summary = memory_peak.live_at_peak(memory_peak.record_step(lambda: training_step(model, optimizer, ids), save), device=torch.cuda.current_device())
    print(memory_peak.report(summary, start), flush=True)
    return {"start_requested_bytes": start, **summary}


def make_optimizer(params, name: str, step_in_backward: bool = False, capturable_on=None):
    """moetune train's optimizer (adamw, adamw_bf16 or adamw_8bit) at lr 1e-4 and both libraries' default weight decay,
    optionally stepped inside the backward pass. capturable_on: a device, for a step captured as a CUDA graph (adamw
    or adamw_bf16): the step counts, bias corrections and learning rate (a one-element tensor there) on it."""
    from types import SimpleNamespace

    from moetune.training.loop import make_optimizer as train_optimizer

    lr = 1e-4 if capturable_on is None else torch.tensor(1e-4, device=capturable_on)
    return train_optimizer(params, SimpleNamespace(optim=name, lr=lr, weight_decay=0.01,
                                                   step_in_backward=step_in_backward,
                                                   capturable=capturable_on is not None))


def thread_times() -> dict[int, tuple[float, float]]:
    """Each thread of this process: (seconds on a CPU, seconds runnable but waiting for one), from Linux's
    schedstat ({} elsewhere). Backward runs on autograd's own thread per GPU, so the main thread alone undercounts."""
    out = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                on_cpu, waiting, _ = f.read().split()
            out[int(tid)] = (int(on_cpu) / 1e9, int(waiting) / 1e9)
        except (OSError, ValueError):
            continue
    return out


class StepClock:
    """Where a step's wall time went on the host: seconds until the host had queued the whole step (the rest is
    waiting for the GPU), CPU seconds of the busiest thread and of all threads, seconds threads waited for a CPU
    while runnable (a busy or shared host), and seconds in Python's garbage collector."""

    def __init__(self):
        self.gc_s, self._gc_t0 = 0.0, None
        self._threads = {}
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase, info):
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self._gc_t0 is not None:
            self.gc_s += time.perf_counter() - self._gc_t0
            self._gc_t0 = None

    def start(self):
        self._threads, self._gc0 = thread_times(), self.gc_s

    def split(self) -> dict:
        """CPU seconds since start(): busiest thread, all threads, runqueue wait; and GC seconds."""
        now = thread_times()
        cpu = [c - self._threads.get(tid, (0.0, 0.0))[0] for tid, (c, _) in now.items()]
        wait = sum(w - self._threads.get(tid, (0.0, 0.0))[1] for tid, (_, w) in now.items())
        return {"busiest_cpu_s": max(cpu, default=0.0), "cpu_s": sum(cpu), "runqueue_wait_s": wait,
                "gc_s": self.gc_s - self._gc0}

    def close(self):
        gc.callbacks.remove(self._on_gc)


# step_host_s's keys as the console line names them
HOST_LABELS = (("queued_s", "host queued"), ("busiest_cpu_s", "busiest thread cpu"), ("cpu_s", "all threads cpu"),
               ("runqueue_wait_s", "runqueue wait"), ("gc_s", "gc"))


def allocator_peaks(device) -> dict | None:
    """Peak GiB since the statistics' last reset as the allocator counts them (its blocks: what
    max_memory_allocated reports and the memory plan budgets) and as requested. A cached block is handed out whole
    where at most 1 MiB would be left over, so the two differ by what a warm cache's reuse rounds up: a candidate for
    whole Qwen3 8K peaking 0.14 GiB over its checked plan (run 56), whose probe ran on an emptied cache."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return {"allocated_gib": stats.get("allocated_bytes.all.peak", 0) / 2**30,
            "requested_gib": stats.get("requested_bytes.all.peak", 0) / 2**30}


# The allocator's settings: PYTORCH_ALLOC_CONF (torch >= 2.9, read first) and the older PYTORCH_CUDA_ALLOC_CONF.
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def set_expandable_segments(on: bool) -> dict:
    """expandable_segments:True/False in the allocator's settings, the user's other settings kept, in both variables
    (whichever this torch reads). Before the allocator starts. Returns the variables as set."""
    setting = f"expandable_segments:{on}"
    kept = [item for name in ALLOC_CONF_VARS for item in os.environ.get(name, "").split(",")
            if item and not item.startswith("expandable_segments")]
    value = ",".join(list(dict.fromkeys(kept)) + [setting])
    for name in ALLOC_CONF_VARS:
        os.environ[name] = value
    return {name: os.environ[name] for name in ALLOC_CONF_VARS}


def time_steps(model, optimizer, ids, warmup: int, steps: int, device, after_warmup_step=None, run_step=None,
               reset_peak: bool = True) -> tuple[list[float], list[float], float, dict]:
    """warmup + steps training steps on `ids` (labels = ids): (seconds of each timed step, every step's loss,
    seconds of the warm-up, each timed step's host split by StepClock). Peak-memory stats restart after the
    warm-up. after_warmup_step: called after each warm-up step (the memory plan's step checks); where it returns
    True (the plan changed), the warm-up goes on for another step, so the timed steps run a plan that was checked.
    run_step: what a step is, if not training_step (a CUDA graph's replay); reset_peak=False keeps the peak-memory
    statistics running from before (a graph's capture allocated its step's memory then)."""
    times, losses = [], []
    host = {key: [] for key, _ in HOST_LABELS}
    clock = StepClock()
    t_warmup, warmup_s = time.perf_counter(), 0.0
    warmed, changed, timing = 0, False, False
    try:
        while not timing or len(times) < steps:
            if not timing and warmed >= warmup and not changed:
                timing = True
                _sync(device)
                warmup_s = time.perf_counter() - t_warmup
                if device.type == "cuda" and reset_peak:
                    torch.cuda.reset_peak_memory_stats()
                if steps == 0:
                    break
            t0 = time.perf_counter()
            clock.start()
            loss = run_step() if run_step is not None else training_step(model, optimizer, ids)
            queued = time.perf_counter() - t0
            _sync(device)
            if timing:
                times.append(time.perf_counter() - t0)
                host["queued_s"].append(queued)
                for key, value in clock.split().items():
                    host[key].append(value)
            else:
                warmed += 1
                changed = bool(after_warmup_step()) if after_warmup_step is not None else False
            losses.append(loss.item())
    finally:
        clock.close()
    return times, losses, warmup_s, host


def save_baseline_lora_init(source, args, device) -> str:
    """The LoRA factors transformers+PEFT draws (under run()'s seed), saved as a PEFT adapter for moetune to load."""
    import tempfile

    torch.manual_seed(0)
    model = build_baseline(source, args.model, args.rank, args.alpha, device)
    path = tempfile.mkdtemp(prefix="moetune-lora-init-")
    model.save_pretrained(path)
    del model
    gc.collect()
    return path


def run(provider, source, config, seq, args, device) -> dict:
    torch.manual_seed(0)
    plan, probe_peaks = None, None
    if provider == "moetune":
        from moetune import lora_linear
        from moetune.models import fast_routers, fast_sinks, hook, recompute

        # off: measure what the recompute skip gains (the experts' down projection in each recompute)
        hook.recomputing = recompute.recomputing if args.recompute_skip == "on" else (lambda: False)
        fast_sinks.CAUSAL_ON_FUSED_ATTENTION = args.sink_causal == "on"
        if args.lora_concat == "off":  # on: the library's own ratio (one setting a process, as args are)
            lora_linear.CONCAT_K_MIN_RATIO = None
        fast_routers.TENSOR_CORE_LOGITS = args.router_logits == "bf16"
        lora_linear.LORA_TERM_FIRST = args.lora_term == "first"
        offload = {"auto": None, "on": True, "off": False}[args.offload]
        model = build_moetune(
            source, args.model, args.rank, args.alpha, device, offload, args.fused_rotary == "on",
            None if args.checkpoint_layers == "auto" else args.checkpoint_layers, args.fused_router == "on",
            args.lora_groups == "on", args.fused_sinks == "on",
        )
        if args.keep_attention == "all":
            from moetune.fast_model import _decoder_layers
            from moetune.models.kept_attention import keep_attention

            layers = _decoder_layers(model)
            print(f"kept attention in {keep_attention(layers, len(layers))} layers", flush=True)
        if args.checkpoint_layers == "auto":  # measured for this step's shape (one probe step)
            import moetune

            plan = moetune.FastMoEModel.fit_checkpoint_layers(model, 1, seq, optimizer=args.optim,
                                                              max_memory_gib=args.max_memory,
                                                              keep_attention=args.keep_attention == "on",
                                                              step_in_backward=args.step_in_backward)
            print(f"checkpoint_layers auto: {plan}", flush=True)
            if plan.get("verified_peak_bytes") is not None:  # the checked plan's probe ran last (it restarts the
                probe_peaks = allocator_peaks(device)          # statistics); its peak, without the optimizer state
        if args.lora_init_dir:  # the baseline's own LoRA init, through the PEFT adapter format
            from moetune.adapters import load_adapter_weights

            load_adapter_weights(model, args.lora_init_dir)
    else:
        model = build_baseline(source, args.model, args.rank, args.alpha, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = args.cuda_graph == "on" and provider == "moetune"
    if graphed:
        from moetune.training.cuda_graph import without_rng_state

        without_rng_state(model)
        optimizer = make_optimizer(params, args.optim, args.step_in_backward, capturable_on=device)
    else:
        optimizer = make_optimizer(params, args.optim, args.step_in_backward and provider == "moetune")
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=gen).to(device)
    from moetune.checkpoint_plan import StepChecks

    # the warm-up steps against an auto plan's budget, as moetune train checks its first steps (a no-op otherwise)
    plan_checks = StepChecks(model, plan, device)
    try:
        # freeze: everything built so far (the model, its hooks) leaves the collector, as in moetune train
        with collector_frozen() if args.gc == "freeze" else contextlib.nullcontext():
            if graphed:  # eager warm-up (compiles, autotuning, the plan's checks, the optimizer's state), then replays
                from moetune.training.cuda_graph import capture_step, on_side_stream
                from moetune.training.offload import StaticHostBuffers

                # on the stream the capture will use, as moetune train does: the per-stream cuBLAS workspaces the
                # capture needs are then made, and counted by the plan's checks, here
                side = torch.cuda.Stream(device)
                host_buffers = StaticHostBuffers()  # the offloaded layer inputs', made eagerly, reused by the graph
                with host_buffers.active():
                    _, eager_losses, _, _ = on_side_stream(functools.partial(
                        time_steps, model, optimizer, ids, max(args.warmup, 1), 0, device, plan_checks.after_step),
                        side)
                    # the peak from here: the capture's warm-up steps and its graph's pool (replays allocate nothing)
                    torch.cuda.reset_peak_memory_stats()
                    replay = capture_step(functools.partial(training_step, model, optimizer, ids), stream=side)
                times, losses, _, host = time_steps(model, optimizer, ids, 0, args.steps, device,
                                                    run_step=replay, reset_peak=False)
                losses = eager_losses + losses  # (the capture's own warm-up steps between them are not listed)
            else:
                times, losses, _, host = time_steps(model, optimizer, ids, args.warmup, args.steps, device,
                                                    plan_checks.after_step)
        # the timed steps' peaks, before the profiled and memory-history steps below add theirs
        peak_allocator = allocator_peaks(device)
        peak_gib = None if peak_allocator is None else peak_allocator["allocated_gib"]  # max_memory_allocated
        profile = profile_step(model, optimizer, ids, device) if provider in args.profile else None
        memory = memory_peak_step(model, optimizer, ids, provider, seq, args) \
            if provider in args.memory_peak and device.type == "cuda" else None
        result = {
            "step_s": statistics.median(times),
            "step_times_s": times,
            "step_host_s": host,
            "tokens_per_s": seq / statistics.median(times),
            "peak_gib": peak_gib,
            "peak_allocator": peak_allocator,
            "trainable_params": sum(p.numel() for p in params),
            "losses": losses,
        }
        if profile:
            result["profile"] = profile
        if memory:
            result["memory_peak"] = memory
    except torch.OutOfMemoryError:
        result = {"oom": True}
    if provider == "moetune":
        from moetune.lora_groups import grouped_layers
        from moetune.models.fast_rotary import installed_modules, uninstall_fast_rotary
        from moetune.models.fast_routers import fused_routers

        result["fused_rotary"] = bool(installed_modules())  # what ran (never on CPU)
        result["grouped_lora_layers"] = grouped_layers(model)
        result["fused_routers"] = len(fused_routers(model))
        result["fused_sinks"] = fast_sinks.wrapped() and fast_sinks.runs_flex_with_sinks(model)  # what ran
        if plan is not None:
            result["checkpoint_plan"] = plan
            result["plan_probe_allocator"] = probe_peaks
        # process-wide swaps: the baseline must run transformers' own rotary and flex attention (sinks)
        uninstall_fast_rotary()
        fast_sinks.uninstall_fast_sinks()
    replay = None  # a CUDA graph's pool holds its step's memory until the graph goes
    del model, optimizer, params, replay
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
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", nargs="*", default=[], choices=["moetune", "baseline"],
                        help="after timing, profile one more step of these providers (GPU time per kernel group)")
    parser.add_argument("--memory-peak", nargs="*", default=[], choices=["moetune", "baseline"],
                        help="one more step under the allocator's history: the tensors alive at its peak (CUDA)")
    parser.add_argument("--tiny", action="store_true", help="toy widths (runs on CPU, fp32): checks the script")
    parser.add_argument("--offload", default="auto", choices=["auto", "on", "off"],
                        help="moetune: offload checkpointed layer inputs to pinned host memory (auto: on CUDA)")
    parser.add_argument("--checkpoint-layers", type=layers_or_auto, default=None,
                        help="moetune: checkpoint only this many decoder layers (default all; the rest are not recomputed); "
                             "auto: as many as memory needs (FastMoEModel.fit_checkpoint_layers)")
    parser.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                        help="moetune with --checkpoint-layers auto: plan the step to peak within this many GiB")
    parser.add_argument("--keep-attention", default="on", choices=["on", "off", "all"],
                        help="moetune with --checkpoint-layers auto: checkpointed layers may keep their attention "
                             "output where memory allows (off: every checkpointed layer recomputes it); "
                             "all: every checkpointed layer keeps it, no plan")
    parser.add_argument("--fused-rotary", default="on", choices=["on", "off"],
                        help="moetune: the fused rotary kernel (on CUDA)")
    parser.add_argument("--fused-router", default="on", choices=["on", "off"],
                        help="moetune: the router's softmax and top-k as one Triton launch each way (on CUDA)")
    parser.add_argument("--fused-sinks", default="on", choices=["on", "off"],
                        help="moetune: gpt-oss's attention sinks on flex attention's output as one Triton launch each "
                             "way (on CUDA)")
    parser.add_argument("--sink-causal", default="on", choices=["on", "off"],
                        help="moetune with --fused-sinks on: gpt-oss's full-attention layers (plain causal) on torch's "
                             "fused cuDNN attention with the sinks after it instead of flex attention "
                             "(moetune/kernels/causal_sink_attention.py)")
    parser.add_argument("--lora-groups", default="on", choices=["on", "off"],
                        help="moetune: sibling LoRA projections on one input (q/k/v, ...) as one Function "
                             "(moetune/lora_groups.py; off: one Function a layer)")
    parser.add_argument("--lora-concat", default="on", choices=["on", "off"],
                        help="moetune: projections at least 4x wider than their input (MLA's q_b / kv_b) add the LoRA "
                             "term inside their one GEMM over [x | u] [W | B]^T (moetune/lora_linear.py)")
    parser.add_argument("--lora-term", default="first", choices=["first", "last"],
                        help="moetune: the LoRA Linear path writes the LoRA term first and each base GEMM adds into it "
                             "(moetune/lora_linear.py; last: the base GEMM, then the LoRA term added in a pass of "
                             "its own)")
    parser.add_argument("--router-logits", default="bf16", choices=["bf16", "fp32"],
                        help="moetune: the sigmoid routers' fp32 Linear (GLM, DeepSeek-V3) on bf16 tensor cores with "
                             "fp32 accumulation and output (models/fast_routers.py; fp32: transformers' fp32 GEMM)")
    parser.add_argument("--recompute-skip", default="on", choices=["on", "off"],
                        help="moetune: checkpoint recomputes skip the experts' output (off: recompute it all)")
    parser.add_argument("--same-lora-init", action="store_true",
                        help="moetune starts from the LoRA factors transformers+PEFT draws (loss-curve comparisons)")
    parser.add_argument("--optim", default="adamw", choices=["adamw", "adamw_bf16", "adamw_8bit"],
                        help="optimizer for both providers (adamw8bit needs bitsandbytes)")
    parser.add_argument("--gc", choices=["on", "freeze"], default="freeze",
                        help="freeze (default, as moetune train does, for every provider): move every object built "
                             "before the timed steps out of Python's collector (gc.freeze), so its full collections "
                             "do not walk the model; on: leave the collector as it is (runs before 51c)")
    parser.add_argument("--step-in-backward", action="store_true",
                        help="moetune: the optimizer steps inside the backward pass (no buffer of every gradient)")
    parser.add_argument("--checkpoint", default=None,
                        help="load both models from this checkpoint directory (created, random-initialised, if missing)")
    parser.add_argument("--expandable-segments", choices=["on", "off"], default=None,
                        help="on: the CUDA allocator's expandable segments, which split a cached block wherever 512 "
                             "bytes would be left over, not only more than 1 MiB: does the timed steps' peak then "
                             "match the memory plan's checked one? off: without them (the runs so far). Default: as "
                             "the environment sets it (recorded)")
    parser.add_argument("--cuda-graph", default="off", choices=["on", "off"],
                        help="moetune's timed steps replayed from one CUDA graph captured after the warm-up "
                             "(moetune/training/cuda_graph.py)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.expandable_segments is not None:  # read when the allocator starts: before the first CUDA allocation
        if torch.cuda.is_initialized():
            parser.error("--expandable-segments: CUDA was initialised before the setting could apply")
        set_expandable_segments(args.expandable_segments == "on")
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("needs a CUDA GPU (or --tiny)")
    if args.cuda_graph == "on":
        if args.optim not in ("adamw", "adamw_bf16"):
            parser.error(f"--optim: --cuda-graph on runs adamw or adamw_bf16, got {args.optim}")
        if "moetune" in args.profile or "moetune" in args.memory_peak:
            parser.error("--profile / --memory-peak moetune: they run eager steps, not replays (--cuda-graph on)")
        if not torch.cuda.is_available():
            parser.error("--cuda-graph on: CUDA graphs need a CUDA GPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = make_config(args.model, args.layers, args.tiny)
    source = config
    if args.checkpoint:
        if not os.path.isdir(args.checkpoint):
            t0 = time.perf_counter()
            save_checkpoint(config, args.checkpoint, device)
            print(f"saved a random-initialised checkpoint to {args.checkpoint} in {time.perf_counter() - t0:.0f} s", flush=True)
        source = args.checkpoint
    args.lora_init_dir = None
    if args.same_lora_init:
        args.lora_init_dir = save_baseline_lora_init(source, args, device)
    env = harness.environment()
    env["alloc_conf"] = {name: os.environ.get(name) for name in ALLOC_CONF_VARS}  # what the allocator was told
    rows = []
    print(f"# {env['device']}  torch {env['torch']}  transformers {env['transformers']}  peft {env['peft']}")
    for seq in args.seq:
        for provider in args.providers:
            result = run(provider, source, config, seq, args, device)
            settings = {}
            if provider == "moetune":  # what was on: all layers checkpointed unless checkpoint_layers says otherwise
                chosen = result.get("checkpoint_plan", {}).get("checkpoint_layers", args.checkpoint_layers)
                settings = {"checkpoint_layers": chosen, "checkpoint_layers_asked": args.checkpoint_layers,
                            "offload": args.offload,
                            "recompute_skip": args.recompute_skip,
                            "keep_attention": args.keep_attention, "step_in_backward": args.step_in_backward,
                            "lora_groups": args.lora_groups, "fused_router": args.fused_router,
                            "fused_sinks": args.fused_sinks, "sink_causal": args.sink_causal,
                            "lora_concat": args.lora_concat, "router_logits": args.router_logits,
                            "lora_term": args.lora_term, "cuda_graph": args.cuda_graph == "on"}
            rows.append({"model": args.model, "layers": config.num_hidden_layers, "seq": seq, "provider": provider,
                         **settings, **result})
            if result.get("oom"):
                print(f"{args.model} x{config.num_hidden_layers} seq {seq} {provider}: out of memory", flush=True)
            else:
                print(
                    f"{args.model} x{config.num_hidden_layers} seq {seq} {provider}: {result['tokens_per_s']:.0f} tok/s, "
                    f"{result['step_s'] * 1e3:.0f} ms/step, peak {result['peak_gib'] or 0:.1f} GiB, "
                    f"{result['trainable_params'] / 1e6:.0f}M trainable, loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}, "
                    f"steps {[round(t * 1e3) for t in result['step_times_s']]} ms, "
                    + ", ".join(f"{label} {[round(t * 1e3) for t in result['step_host_s'][key]]} ms"
                                for key, label in HOST_LABELS),
                    flush=True,
                )
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"train-step-{'tiny-' if args.tiny else ''}{args.model}-{env['device'].replace(' ', '_')}.json")
    harness.write_json(out, {"environment": env, "args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
