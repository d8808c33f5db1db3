"""DirectLauncher: Triton's own launch path once per specialisation, the compiled kernel directly after.

On the CPU a real @triton.jit function stands in (decorated with the interpreter off), with Triton's run method and
driver replaced by recorders: the direct path must hand the compiled kernel exactly the arguments Triton binds, and
go back to Triton's path whenever the specialisation may differ. tests/kernels/test_grouped_gemm.py's GPU tests
compare the two paths' results on real launches.
"""

import contextlib
import inspect

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from moetune.kernels import launch as launch_module  # noqa: E402


def _body(x_ptr, n, scale, flag, WIDTH: tl.constexpr, MODE: tl.constexpr = 3):
    pass


class Compiled:
    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.direct = []

    def run(self, *args):
        self.direct.append(args)


@pytest.fixture
def kernel(monkeypatch):
    """(the launcher, the compiled stand-in, Triton-path calls [(grid, bound args)])."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MOETUNE_DIRECT_LAUNCH", raising=False)
    jitted = triton.jit(_body)
    compiled, through_triton = Compiled(), []
    signature = inspect.signature(_body)

    def run(*args, grid, warmup, **kwargs):  # Triton's binding: positional, keywords, then defaults
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
        bound.apply_defaults()
        through_triton.append((grid, tuple(bound.arguments.values())))
        return compiled

    class Driver:
        stream = 1234

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return self.stream

    monkeypatch.setattr(jitted, "run", run)
    driver = Driver()
    monkeypatch.setattr(triton.runtime.driver, "_active", driver)
    launcher = launch_module.DirectLauncher(jitted)
    launcher.driver = driver  # for the tests that switch streams
    assert launcher._direct, "this Triton is not in TESTED_TRITON: the direct path is never taken"
    yield launcher, compiled, through_triton
    assert launcher.direct_launches == len(compiled.direct)


def test_a_repeat_goes_to_the_compiled_kernel_with_tritons_arguments(kernel):
    launcher, compiled, through_triton = kernel
    x = torch.zeros(64)
    launcher((7,), x, 4096, 0.5, True, WIDTH=64, num_warps=4)
    assert len(through_triton) == 1 and not compiled.direct
    launcher((7,), x, 4096, 2.0, True, WIDTH=64, num_warps=4)  # floats are not specialised
    launcher.driver.stream = 5678  # the stream current at each launch
    launcher((3, 2), torch.ones(64), 4096, 0.5, True, WIDTH=64, num_warps=4)
    assert len(through_triton) == 1
    bound = through_triton[0][1]
    assert bound[-2:] == (64, 3)  # the constexprs in the kernel's order, MODE's default included
    first, second = compiled.direct
    assert first[:9] == (7, 1, 1, 1234, "function", "packed", None, None, None)
    assert first[9] is x and first[10:] == (4096, 2.0, True, 64, 3)
    assert second[:4] == (3, 2, 1, 5678) and second[10:] == bound[1:]


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int value", "bool for int", "constexpr", "option",
                                    "untyped argument", "constexpr type", "debug setting"])
def test_what_triton_specialises_on_goes_through_triton_again(kernel, change, monkeypatch):
    launcher, compiled, through_triton = kernel
    x = torch.zeros(64)
    args, constexprs = [x, 4096, 0.5, True], dict(WIDTH=64, num_warps=4)
    launcher((1,), *args, **constexprs)
    if change == "misaligned":
        args[0] = x[1:]  # 4 bytes in: no longer 16-byte aligned
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "int value":
        args[1] = 4097
    elif change == "bool for int":
        args[1] = True  # equal to 1 in a tuple, but Triton types it u1
        launcher((1,), *[x, 1, 0.5, True], **constexprs)
    elif change == "constexpr":
        constexprs["MODE"] = 4
    elif change == "option":
        constexprs["num_warps"] = 8
    elif change == "constexpr type":
        constexprs["WIDTH"] = 64.0  # equal to 64, but Triton keys str(value)
    elif change == "debug setting":
        monkeypatch.setattr(triton.knobs.runtime, "debug", True)  # device asserts: another kernel
    else:
        args[1] = None
    calls_before = len(through_triton)
    launcher((1,), *args, **constexprs)
    assert len(through_triton) == calls_before + 1 and not compiled.direct


def test_switched_off_or_hooked_launches_go_through_triton(kernel, monkeypatch):
    launcher, compiled, through_triton = kernel
    x = torch.zeros(64)
    launcher((1,), x, 16, 0.5, False, WIDTH=32)
    monkeypatch.setenv("MOETUNE_DIRECT_LAUNCH", "0")
    launcher((1,), x, 16, 0.5, False, WIDTH=32)
    monkeypatch.delenv("MOETUNE_DIRECT_LAUNCH")
    hooks = triton.knobs.runtime.launch_exit_hook
    if hasattr(hooks, "add"):  # Triton 3.6+: a chain, empty unless a profiler adds to it
        hooks.add(seen := lambda metadata: None)
        try:
            launcher((1,), x, 16, 0.5, False, WIDTH=32)
        finally:
            hooks.remove(seen)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: None)  # older: a function
    launcher((1,), x, 16, 0.5, False, WIDTH=32)
    assert len(through_triton) == 3 + hasattr(hooks, "add") and not compiled.direct


def test_calls_of_another_form_go_through_triton_each_time(kernel):
    launcher, compiled, through_triton = kernel
    x = torch.zeros(64)
    for _ in range(2):
        launcher((1,), x, 16, 0.5, False, 64)  # a constexpr passed positionally
        launcher((1,), x, 16, 0.5, flag=False, WIDTH=64)  # a runtime argument by keyword
        launcher(lambda meta: (1,), x, 16, 0.5, False, WIDTH=64)  # a grid computed from the arguments
        launcher((1,), x, 16, 0.5, False, WIDTH=64, extern_libs={"lib": "path"})  # an unhashable option
    assert len(through_triton) == 8 and not compiled.direct


def test_a_launch_triton_did_not_make_is_not_kept(kernel, monkeypatch):
    launcher, compiled, through_triton = kernel
    results = iter([None, compiled, compiled])  # None: Triton's cache hook launched nothing
    run = launcher.kernel.run
    monkeypatch.setattr(launcher.kernel, "run", lambda *a, **kw: run(*a, **kw) and next(results))
    x = torch.zeros(64)
    for _ in range(3):
        launcher((1,), x, 16, 0.5, False, WIDTH=32)
    assert len(through_triton) == 2 and len(compiled.direct) == 1


def test_a_launch_runs_with_its_operands_gpu_current(kernel, monkeypatch):
    """Triton launches on the current GPU and its stream: a launch whose tensors live on another GPU (a model split
    over GPUs, or one on cuda:1 with cuda:0 current) makes theirs current for that launch only."""
    launcher, compiled, through_triton = kernel
    state = {"current": 0, "switches": []}

    @contextlib.contextmanager
    def device(index):
        before, state["current"] = state["current"], index
        state["switches"].append(index)
        try:
            yield
        finally:
            state["current"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    streams = []
    monkeypatch.setattr(launcher.driver, "get_current_stream",
                        lambda index: streams.append((index, state["current"])) or 99, raising=False)
    operands_gpu = {"index": 1}
    x = torch.zeros(64)
    x.get_device = lambda: operands_gpu["index"]  # a stand-in for a tensor on that GPU
    for _ in range(2):  # through Triton, then direct
        launcher((1,), x, 16, 0.5, False, WIDTH=32)
    assert state["switches"] == [1, 1] and state["current"] == 0  # the caller's GPU again after each
    assert streams == [(1, 1)]  # the direct launch: GPU 1's stream, with GPU 1 current
    assert len(through_triton) == 1 and len(compiled.direct) == 1
    operands_gpu["index"] = 0
    launcher((1,), x, 16, 0.5, False, WIDTH=32)
    assert state["switches"] == [1, 1]  # on the current GPU: no switch (its own compiled entry: the key has the GPU)
    assert len(through_triton) == 2
    # Triton's own path (direct launches off, a profiler's hook, ...) is switched too
    operands_gpu["index"] = 1
    triton_run, current_at_run = launcher.kernel.run, []
    monkeypatch.setattr(launcher.kernel, "run",
                        lambda *a, **kw: current_at_run.append(state["current"]) or triton_run(*a, **kw))
    monkeypatch.setenv("MOETUNE_DIRECT_LAUNCH", "0")
    launcher((1,), x, 16, 0.5, False, WIDTH=32)
    assert current_at_run == [1] and state["current"] == 0


def test_the_operands_gpu_is_the_first_tensors():
    assert launch_module._gpu_of((3, torch.zeros(2), 0.5)) == -1  # a CPU tensor (the interpreter): no GPU
    assert launch_module._gpu_of((3, 0.5, True)) == -1
    if launch_module.TensorDescriptor is not None:  # a descriptor counts by its base
        on_gpu_1 = torch.zeros(64)
        on_gpu_1.get_device = lambda: 1
        descriptor = launch_module.TensorDescriptor(on_gpu_1, [8, 8], [8, 1], [8, 8])
        assert launch_module._gpu_of((3, descriptor, torch.zeros(2))) == 1
    if torch.cuda.is_available():
        assert launch_module._gpu_of((3, torch.nn.Parameter(torch.zeros(2, device="cuda:0")), torch.zeros(2))) == 0


def test_launch_calls_a_stand_in_as_triton_would():
    calls = []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    launch_module.launch(StandIn(), (5,), 1, 2, BLOCK=16)
    assert calls == [((5,), (1, 2), {"BLOCK": 16})]


def _block_grads(monkeypatch, direct: bool, tokens=300, seed=0):
    """Output and gradients of one experts block on the triton backend (bf16, below autotuning's MIN_TUNE_ROWS:
    the heuristic configs), run twice (the second call of each launch goes direct unless switched off)."""
    from moetune.experts import ExpertLoRA, moe_experts

    if direct:
        monkeypatch.delenv("MOETUNE_DIRECT_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("MOETUNE_DIRECT_LAUNCH", "0")
    gen = torch.Generator().manual_seed(seed)
    E, H, I, k, R = 8, 384, 192, 2, 8

    def rand(*shape, scale=0.05):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)

    x, gate_up, down = rand(tokens, H, scale=1.0), rand(E, 2 * I, H), rand(E, H, I)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)]).cuda()
    ids[ids == 3] = 2  # an empty expert
    weights = torch.rand(tokens, k, generator=gen).cuda().to(torch.bfloat16)
    factors = [rand(E, R, H).float(), rand(E, 2 * I, R).float(), rand(E, R, I).float(), rand(E, H, R).float()]
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, weights, *factors)]
        lora = ExpertLoRA(*leaves[2:], scaling=2.0)
        out = moe_experts(leaves[0], ids, leaves[1], gate_up, down, lora=lora, backend="triton")
        out.float().square().sum().backward()
        results.append([out, *(leaf.grad for leaf in leaves)])
    return results


def _launchers(*names: str) -> dict:
    """{module.kernel name: its DirectLauncher, launch count reset}."""
    import importlib

    launchers = {}
    for name in names:
        module, kernel = name.split(".")
        launchers[name] = launch_module.launcher_of(getattr(importlib.import_module(f"moetune.kernels.{module}"), kernel))
        launchers[name].direct_launches = 0
    return launchers


@pytest.mark.gpu
def test_direct_launches_give_tritons_results_on_gpu(monkeypatch):
    launchers = _launchers("grouped_gemm.grouped_gemm_kernel", "grouped_wgrad.grouped_wgrad_kernel")
    through_triton = _block_grads(monkeypatch, direct=False)
    assert not any(launcher.direct_launches for launcher in launchers.values())
    direct = _block_grads(monkeypatch, direct=True)
    for name, launcher in launchers.items():
        assert launcher.direct_launches, f"{name} never launched directly"
    for got, ref in zip(direct[0] + direct[1], through_triton[0] + through_triton[1]):
        assert torch.equal(got, ref)


@pytest.mark.gpu
def test_a_misaligned_input_after_an_aligned_one_compiles_its_own_kernel(monkeypatch):
    from moetune.kernels import grouped_gemm

    monkeypatch.delenv("MOETUNE_DIRECT_LAUNCH", raising=False)
    gen = torch.Generator().manual_seed(0)
    E, T, K, N, k = 4, 97, 136, 72, 2
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).cuda()
    from moetune.experts import plan_routing

    plan = plan_routing(ids, E)
    b = torch.randn(E, K, N, generator=gen).cuda().to(torch.bfloat16)
    x = torch.randn(T, K, generator=gen).cuda().to(torch.bfloat16)
    common = dict(num_rows=plan.num_rows, offsets_E=plan.offsets_E, counts_E=plan.counts_E, a_index=plan.token_S)
    ref = torch.einsum("sk,skn->sn", x[plan.token_S].double(), b.double()[plan.expert_S])
    wider = torch.zeros(T, K + 1, device="cuda", dtype=torch.bfloat16)
    wider[:, 1:] = x  # the same values 2 bytes in: neither the base nor the row pitch 16-byte aligned
    (launcher,) = _launchers("grouped_gemm.grouped_gemm_kernel").values()
    launcher._compiled.clear()  # (kernels Triton compiled stay in Triton's cache)
    seen = []  # (kernels keyed, direct launches) after each call
    for a in (x, x, wider[:, 1:], wider[:, 1:], x):
        out = grouped_gemm(a, b, **common)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, err
        seen.append((len(launcher._compiled), launcher.direct_launches))
    # the misaligned input is keyed apart (through Triton once), then both are launched directly
    assert seen == [(1, 0), (1, 1), (2, 1), (2, 2), (2, 3)]


def _other_kernels(direct: bool, monkeypatch, device="cuda", dtype=torch.bfloat16):
    """Forward and backward of moetune's per-layer kernels (RMSNorm, rotary, the latent-attention inputs, the
    cross-entropy), twice each, bf16 on the GPU: [outputs and gradients of the second round]."""
    from moetune.kernels.cross_entropy import cross_entropy_
    from moetune.kernels.mla_inputs import mla_inputs
    from moetune.kernels.rms_norm import rms_norm
    from moetune.kernels.rotary import rotary

    if direct:
        monkeypatch.delenv("MOETUNE_DIRECT_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("MOETUNE_DIRECT_LAUNCH", "0")
    results = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(0)

        def rand(*shape, gen=gen):
            return torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_()

        B, T, Hh, nope, rope, v = 1, 40, 4, 32, 16, 24
        x, weight = rand(B, T, 96), rand(96)
        q, kv, k_rot = rand(B, T, Hh, nope + rope), rand(B, T, Hh, nope + v), rand(B, T, rope)
        cos, sin = (torch.randn(1, T, rope, generator=gen).to(device, dtype) for _ in range(2))
        heads = rand(B, Hh, T, rope)
        normed = rms_norm(x, weight, 1e-6)
        rotated = rotary(heads, cos, sin)
        query, key, value = mla_inputs(q, kv, k_rot, cos, sin, nope, True)
        outputs = [normed, rotated, query, key, value]
        sum(out.float().square().sum() for out in outputs).backward()
        logits = torch.randn(T, 300, generator=gen).to(device, dtype)
        targets = torch.randint(0, 300, (T,), generator=gen).to(device)
        loss = cross_entropy_(logits, targets, -100, 0.5, True, 0)
        results = [*outputs, *(t.grad for t in (x, weight, q, kv, k_rot, heads)), loss, logits]
    return results


@pytest.mark.gpu
def test_the_per_layer_kernels_give_tritons_results_through_direct_launches_on_gpu(monkeypatch):
    launchers = _launchers("rms_norm.rms_norm_forward_kernel", "rms_norm.rms_norm_backward_kernel",
                           "rotary.rotary_kernel", "cross_entropy.cross_entropy_kernel",
                           "mla_inputs.mla_inputs_forward_kernel", "mla_inputs.mla_inputs_backward_kernel")
    through_triton = _other_kernels(False, monkeypatch)
    direct = _other_kernels(True, monkeypatch)
    for name, launcher in launchers.items():
        assert launcher.direct_launches, f"{name} never launched directly"
    for got, ref in zip(direct, through_triton, strict=True):
        assert torch.equal(got, ref)
