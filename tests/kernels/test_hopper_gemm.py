"""The Gluon sorted-rows GEMM for Hopper (moetune/kernels/hopper_gemm.py) against float64.

Gluon has no interpreter: the kernel runs on an sm90 GPU only (tests marked gpu). Its host-side checks run on CPU.
"""

import functools
import importlib

import pytest
import torch

from moetune.experts import plan_routing
from moetune.kernels import hopper_gemm
from moetune.kernels.hopper_gemm import CONFIGS, sorted_gemm, sorted_gemm_supported, weight_mode


def test_weight_mode_reads_the_two_layouts_tma_can_box():
    assert weight_mode(torch.empty(4, 32, 48).transpose(1, 2)) == 1  # a transposed [E, N, K] weight
    assert weight_mode(torch.empty(4, 48, 32)) == 2  # a contiguous [E, K, N] weight
    assert weight_mode(torch.empty(4, 48, 64)[:, :, :32]) == 0  # neither: rows with a gap


def test_sorted_gemm_says_why_not_off_hopper():
    a, b = torch.empty(8, 16, dtype=torch.bfloat16), torch.empty(2, 16, 16, dtype=torch.bfloat16)
    assert sorted_gemm_supported(a, b) is not None  # CPU tensors: never this kernel


class _OnCuda(torch.Tensor):
    """CPU storage, reported on CUDA device 0: what sorted_gemm_supported reads of a GPU tensor."""

    @property
    def device(self):
        return type("FakeDevice", (), {"type": "cuda", "index": 0})()


def _on_hopper(monkeypatch):
    """With an sm90 GPU faked: a maker of zero tensors that report themselves on it."""
    monkeypatch.setattr(importlib.import_module("moetune.kernels.grouped_gemm"), "_capability", lambda index: (9, 0))
    return lambda *shape, dtype=torch.bfloat16: torch.zeros(*shape, dtype=dtype).as_subclass(_OnCuda)


def test_sorted_gemm_rejects_what_its_boxes_would_read_wrong(monkeypatch):
    """With the GPU checks faked: LoRA factors of another rank or shape, a rank over 64, U rows not 16-byte aligned,
    empty operands."""
    if hopper_gemm.gluon is None:
        pytest.skip("triton without Gluon")
    t = _on_hopper(monkeypatch)
    a, b = t(40, 64), t(4, 64, 48)
    assert sorted_gemm_supported(a, b) is None
    assert sorted_gemm_supported(a, b, t(40, 16), t(4, 16, 48)) is None
    assert "0 < R <= 64" in sorted_gemm_supported(a, b, t(40, 16), t(4, 32, 48))  # lora_b of another rank
    assert "0 < R <= 64" in sorted_gemm_supported(a, b, t(40, 72), t(4, 72, 48))
    assert "TMA cannot read" in sorted_gemm_supported(a, b, t(40, 20)[:, :16], t(4, 16, 48))  # 40-byte U rows
    assert "lora_u [S, R]" in sorted_gemm_supported(a, b, t(39, 16), t(4, 16, 48))  # a U row missing: read as 0
    assert sorted_gemm_supported(t(0, 64), b) == "empty operands"


def test_sorted_gemm_takes_the_lora_input_in_its_loop_only_where_tma_can_read_its_factor(monkeypatch):
    """lora_u_weight [E, K, R], contiguous or a transposed [E, R, K]: U is then written with plain stores, so its
    buffer needs no TMA alignment; the factor must have the launch's E, K, R, dtype and 16-byte rows."""
    if hopper_gemm.gluon is None:
        pytest.skip("triton without Gluon")
    t = _on_hopper(monkeypatch)
    a, b, lb = t(40, 64), t(4, 64, 48), t(4, 16, 48)
    for ua in (t(4, 64, 16), t(4, 16, 64).transpose(1, 2)):
        assert sorted_gemm_supported(a, b, t(40, 16), lb, lora_u_weight=ua) is None
        assert sorted_gemm_supported(a, b, t(40, 20)[:, :16], lb, lora_u_weight=ua) is None  # U only stored
    assert "lora_u_weight [E, K, R]" in sorted_gemm_supported(a, b, t(40, 16), lb, lora_u_weight=t(4, 64, 8))
    assert "lora_u_weight [E, K, R]" in sorted_gemm_supported(a, b, t(40, 16), lb, lora_u_weight=t(3, 64, 16))
    assert "lora_u_weight [E, K, R]" in sorted_gemm_supported(
        a, b, t(40, 16), lb, lora_u_weight=t(4, 64, 16, dtype=torch.float16))
    assert "lora_u_weight [E, K, R]" in sorted_gemm_supported(  # neither layout: rows with gaps
        a, b, t(40, 16), lb, lora_u_weight=t(4, 64, 32)[:, :, :16])
    assert "needs lora_u" in sorted_gemm_supported(a, b, None, lb, lora_u_weight=t(4, 64, 16))
    assert "lora_u [S, R]" in sorted_gemm_supported(a, b, t(39, 16), lb, lora_u_weight=t(4, 64, 16))
    # sorted_gemm itself refuses what would hang the kernel (no U buffer) or write past it, before any launch.
    common = dict(offsets_E=torch.tensor([10, 20, 30, 40]), counts_E=torch.full((4,), 10), num_rows=40, lora_b=lb,
                  lora_u_weight=t(4, 64, 16))
    for u in (None, t(39, 16)):
        with pytest.raises(ValueError, match="lora_u: expected the .num_rows=40, R. buffer"):
            sorted_gemm(a, b, lora_u=u, **common)


def test_the_kernel_compiles_for_hopper_at_each_rank_class_and_layout_within_its_shared_memory():
    """Compiled offline for sm90 (no GPU needed) as sorted_gemm launches it: ranks 8, 16, 32, 48 and 64 (R_PAD 16,
    32 or 64: a power of 2, as Gluon's shapes must be; 48 failed to compile with R_PAD 48), U given or in the loop,
    UA in either layout beside either weight layout. The first config fits an H100's shared memory in every case."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if hopper_gemm.gluon is None:
        pytest.skip("triton without Gluon")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA compiler backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_hopper_gemm.py"))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 30 and all(row["fits"] for row in rows), rows
    assert {row["rank"]: row["R_PAD"] for row in rows} == {8: 16, 16: 16, 32: 32, 48: 64, 64: 64}
    in_loop = [row["shared"] for row in rows if row["ua_mode"] is not None]
    given = [row["shared"] for row in rows if row["ua_mode"] is None]
    assert min(in_loop) > max(given)  # the UA ring and U's buffer


def _randn_bf16(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)


def _routed_case(seed, T, E, k):
    """(routing plan, its rows, a bf16 random-tensor maker on the GPU), all from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    plan = _routing(T, E, k, gen)
    return plan, plan.num_rows, functools.partial(_randn_bf16, gen)


def _hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper_gemm.gluon is not None


def _routing(T, E, k, gen, skew=None):
    if skew == "one_expert":  # every token's first choice is expert 1: one expert takes T rows
        ids = torch.stack([torch.cat([torch.tensor([1]), torch.randperm(E - 1, generator=gen)[: k - 1] + 2])
                           for _ in range(T)]) % E
    elif skew == "empty":  # experts 0 and 3 get no rows
        pool = torch.tensor([e for e in range(E) if e not in (0, 3)])
        ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    return plan_routing(ids.cuda(), E)


def _reference(a, b, u, lb, bias, row_scale, plan, alpha):
    """float64 C in sorted-row order."""
    ends = [0] + plan.offsets_E.tolist()
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64, device=a.device)
    for e in range(b.shape[0]):
        lo, hi = ends[e], ends[e + 1]
        if hi == lo:
            continue
        v = a[lo:hi].double() @ b[e].double()
        if u is not None:
            v += u[lo:hi].double() @ lb[e].double()
        v *= alpha
        if bias is not None:
            v += bias[e].double()
        if row_scale is not None:
            v *= row_scale[lo:hi].double()[:, None]
        out[lo:hi] = v
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("case", ["T1", "empty_experts", "one_expert", "odd_sizes", "no_lora_bias", "rank8"])
@pytest.mark.parametrize("mode", [1, 2])
def test_sorted_gemm_matches_float64_on_hopper(config, case, mode):
    if not _hopper():
        pytest.skip("needs an sm90 GPU and triton with Gluon")
    gen = torch.Generator().manual_seed(11)
    E, k = 6, 2
    T, K, N, R = {"T1": (1, 128, 256), "odd_sizes": (301, 200, 328)}.get(case, (400, 192, 320)) + (16,)
    if case == "rank8":
        R = 8
    plan = _routing(T, E, k, gen, skew={"empty_experts": "empty", "one_expert": "one_expert"}.get(case))
    S = plan.num_rows

    bf16 = functools.partial(_randn_bf16, gen)

    a = bf16(S, K)
    b = bf16(E, N, K, scale=0.1).transpose(1, 2) if mode == 1 else bf16(E, K, N, scale=0.1)
    lora = case != "no_lora_bias"
    u = bf16(S, R) if lora else None
    lb = (bf16(E, N, R, scale=0.1).transpose(1, 2) if mode == 1 else bf16(E, R, N, scale=0.1)) if lora else None
    bias = bf16(E, N) if case == "no_lora_bias" else None
    row_scale = bf16(S).abs() if case != "no_lora_bias" else None
    scatter = case != "no_lora_bias"
    assert sorted_gemm_supported(a, b, u, lb) is None
    out = torch.full((S, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    sorted_gemm(a, b, plan.offsets_E, plan.counts_E, num_rows=S, lora_u=u, lora_b=lb, alpha=0.5, bias=bias,
                out=out, out_index=plan.perm_S if scatter else None, row_scale=row_scale, config=CONFIGS[config])
    ref = _reference(a, b, u, lb, bias, row_scale, plan, 0.5)
    got = out.double()
    if scatter:  # rows were stored at perm_S[i]
        got = got[plan.perm_S]
    assert torch.isfinite(got).all(), "rows left unwritten"
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


def _fits(run):
    """run(), or pytest.skip where the config needs more shared memory than the GPU has (autotuning drops it)."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - Triton's OutOfResources, raised where the binary is loaded
        if "OutOfResources" in type(err).__name__ or "out of resource" in str(err).lower():
            pytest.skip(f"does not fit: {err}")
        raise


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("case", ["T1", "empty_experts", "one_expert", "odd_sizes", "rank8", "rank48", "rank64",
                                  "many_tiles", "mixed_layouts"])
@pytest.mark.parametrize("mode", [1, 2])
def test_sorted_gemm_with_the_lora_input_in_its_loop_matches_float64_on_hopper(config, case, mode):
    """U = u_alpha * A @ UA[e] accumulated in the main loop (the factor in the weight's orientation, as the down
    projection's A2 and the dgrad's B1 are, or in the other one): U written out as its own launch would round it,
    and C computed from that rounded U. many_tiles: ~1,000 tiles, so each program (one per SM) runs several, the
    ping-pong consumers both, and U's shared buffer and the rings are reused across tiles."""
    if not _hopper():
        pytest.skip("needs an sm90 GPU and triton with Gluon")
    gen = torch.Generator().manual_seed(12)
    E, k = (8, 8) if case == "many_tiles" else (6, 2)
    T, K, N = {"T1": (1, 128, 256), "odd_sizes": (301, 200, 328), "many_tiles": (4096, 256, 1024)}.get(
        case, (400, 192, 320))
    R = {"rank8": 8, "rank48": 48, "rank64": 64}.get(case, 16)
    ua_mode = 3 - mode if case == "mixed_layouts" else mode
    plan = _routing(T, E, k, gen, skew={"empty_experts": "empty", "one_expert": "one_expert"}.get(case))
    S = plan.num_rows
    bf16 = functools.partial(_randn_bf16, gen)
    a = bf16(S, K)
    b = bf16(E, N, K, scale=0.1).transpose(1, 2) if mode == 1 else bf16(E, K, N, scale=0.1)
    ua = bf16(E, R, K, scale=0.1).transpose(1, 2) if ua_mode == 1 else bf16(E, K, R, scale=0.1)
    lb = bf16(E, N, R, scale=0.1).transpose(1, 2) if mode == 1 else bf16(E, R, N, scale=0.1)
    row_scale = bf16(S).abs()
    assert sorted_gemm_supported(a, b, torch.empty(S, R, device="cuda", dtype=torch.bfloat16), lb,
                                 lora_u_weight=ua) is None
    u = torch.full((S, R), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = torch.full((S, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    _fits(lambda: sorted_gemm(a, b, plan.offsets_E, plan.counts_E, num_rows=S, lora_u=u, lora_b=lb, lora_u_weight=ua,
                              lora_u_alpha=2.0, alpha=0.5, out=out, out_index=plan.perm_S, row_scale=row_scale,
                              config=CONFIGS[config]))
    torch.cuda.synchronize()
    u_ref = _reference(a, ua, None, None, None, None, plan, 2.0)
    assert torch.isfinite(u).all(), "U rows left unwritten"
    u_err = ((u.double() - u_ref).norm() / u_ref.norm()).item()
    assert u_err < 1e-2, u_err
    ref = _reference(a, b, u, lb, None, row_scale, plan, 0.5)  # from the U the kernel wrote (rounded to bf16)
    got = out.double()[plan.perm_S]
    assert torch.isfinite(got).all(), "rows left unwritten"
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_grouped_gemm_runs_a_gluon_pick_with_the_lora_input_in_its_loop_as_its_triton_configs(config):
    """The down projection's in-loop form (lora_u_weight, row scale, scatter) through grouped_gemm: a GLUON config
    writes the U and C its Triton configs write, to within the order of the K sums."""
    from moetune.kernels import grouped_gemm
    from moetune.kernels.grouped_gemm import candidates_for

    if not _hopper():
        pytest.skip("needs an sm90 GPU and triton with Gluon")
    E, K, N, R = 8, 192, 264, 16
    plan, S, bf16 = _routed_case(seed=6, T=1000, E=E, k=4)
    a, row_scale = bf16(S, K), bf16(S)
    ua, lb = bf16(E, R, K, scale=0.1).transpose(1, 2), bf16(E, N, R, scale=0.1).transpose(1, 2)  # as down's views
    b = bf16(E, N, K, scale=0.1).transpose(1, 2)
    outs = {}
    for name, cfg in (("triton", candidates_for(0, S, E, N, K)[0]), ("gluon", dict(CONFIGS[config], GLUON=True))):
        u = torch.empty(S, R, device="cuda", dtype=torch.bfloat16)
        out = _fits(functools.partial(grouped_gemm, a, b, num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E,
                                      lora_u_weight=ua, lora_u_alpha=2.0, lora_u_out=u, lora_u_in_loop=True,
                                      lora_b=lb, out_index=plan.perm_S, row_scale=row_scale, alpha=0.5, config=cfg))
        outs[name] = (u.double(), out.double())
    for got, want in zip(outs["gluon"], outs["triton"]):
        err = ((got - want).norm() / want.norm()).item()
        assert err < 5e-3, err


@pytest.mark.gpu
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_grouped_gemm_runs_a_gluon_pick_as_close_as_its_triton_configs(config):
    """A Gluon config picked by grouped_gemm's third tuning step computes what its Triton configs do (down projection
    form: LoRA input given, row scale, scatter), on rows that are not a multiple of any tile."""
    from moetune.kernels import grouped_gemm
    from moetune.kernels.grouped_gemm import candidates_for

    if not _hopper():
        pytest.skip("needs an sm90 GPU and triton with Gluon")
    E, K, N, R = 8, 192, 264, 16
    plan, S, bf16 = _routed_case(seed=5, T=1000, E=E, k=4)
    a, u, row_scale = bf16(S, K), bf16(S, R), bf16(S)
    b, lb = bf16(E, N, K, scale=0.1).transpose(1, 2), bf16(E, N, R, scale=0.1).transpose(1, 2)  # as down's views
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E, lora_u=u, lora_b=lb,
                  out_index=plan.perm_S, row_scale=row_scale, alpha=2.0)
    triton_out = grouped_gemm(a, b, config=candidates_for(0, S, E, N, K)[0], **common)
    gluon_out = grouped_gemm(a, b, config=dict(CONFIGS[config], GLUON=True), **common)
    err = ((gluon_out.double() - triton_out.double()).norm() / triton_out.double().norm()).item()
    assert err < 5e-3, err


def test_scratch_allocator_is_set_per_thread_and_never_replaces_one_set():
    """The kernel makes its TMA descriptors in Triton's global scratch, whose allocator Triton keeps in a ContextVar:
    a thread that never set one (autograd's backward thread) gets torch's; one already set is kept."""
    import threading

    if hopper_gemm.gluon is None or hopper_gemm._allocation is None:
        pytest.skip("triton without Gluon")
    allocator = hopper_gemm._allocation._allocator
    seen = {}

    def fresh_thread():
        seen["before"] = allocator.get()
        hopper_gemm._scratch_allocator_set()
        seen["after"] = allocator.get()

        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        hopper_gemm.triton.set_allocator(mine)
        hopper_gemm._scratch_allocator_set()
        seen["kept"] = allocator.get() is mine

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert isinstance(seen["before"], hopper_gemm._allocation.NullAllocator)
    assert seen["after"] is hopper_gemm._scratch and seen["kept"]


@pytest.mark.gpu
def test_sorted_gemm_launches_directly_from_a_thread_without_an_allocator():
    """As the dgrad runs in backward: a thread with no Triton allocator set, and repeats handed straight to the
    compiled kernel (launch.py), bitwise equal to the first launch."""
    import threading

    from moetune.kernels.launch import launcher_of

    if not _hopper():
        pytest.skip("needs an sm90 GPU and triton with Gluon")
    E, K, N, R = 8, 256, 384, 16
    plan, S, bf16 = _routed_case(seed=3, T=700, E=E, k=4)
    a, u = bf16(S, K), bf16(S, R)
    b, lb = bf16(E, K, N, scale=0.1), bf16(E, R, N, scale=0.1)
    outs, errors = [], []

    def run():
        try:
            for _ in range(3):
                outs.append(sorted_gemm(a, b, plan.offsets_E, plan.counts_E, num_rows=S, lora_u=u, lora_b=lb))
            torch.cuda.synchronize()
        except Exception as err:  # reported below, on the test's thread
            errors.append(err)

    launcher = launcher_of(hopper_gemm.sorted_gemm_kernel)
    before = launcher.direct_launches
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not errors, errors
    assert launcher.direct_launches - before == 2
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    ref = _reference(a, b, u, lb, None, None, plan, 1.0)
    err = ((outs[0].double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


def test_scratch_allocator_set_once_per_thread_where_triton_hides_it(monkeypatch):
    """A Triton whose allocator cannot be read: set once in each thread, so one the user sets later is kept."""
    import threading

    if hopper_gemm.gluon is None:
        pytest.skip("triton without Gluon")
    monkeypatch.setattr(hopper_gemm, "_allocation", None)
    calls = []
    monkeypatch.setattr(hopper_gemm.triton, "set_allocator", calls.append)

    def twice():
        hopper_gemm._scratch_allocator_set()
        hopper_gemm._scratch_allocator_set()

    for _ in range(2):
        thread = threading.Thread(target=twice)
        thread.start()
        thread.join()
    assert calls == [hopper_gemm._scratch, hopper_gemm._scratch]  # once in each of the two threads
