"""The Triton kernels one by one against plain torch (Triton's interpreter on CPU, the GPU when there is one).

Each epilogue of the row-grouped GEMM and each mode of the K-grouped one is checked directly,
so a kernel bug shows up here with its name rather than as a wrong gradient in tests/experts.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from moetune.experts import GptOssGLU, SwiGLU, plan_routing
from moetune.experts.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(
    triton_backend.probe("cuda" if torch.cuda.is_available() else "cpu", 0 if torch.cuda.is_available() else None,
                         torch.float32) is not None,
    reason="no Triton that can run here",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(E=5, T=23, k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    ids[ids == 3] = 2  # expert 3 empty
    return plan_routing(ids.to(DEVICE), E), gen


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEVICE)


def reference_rows(plan, a, b, a_index=None):
    """Row i: a[a_index[i]] @ b[expert(i)] in float64."""
    a_rows = a[a_index] if a_index is not None else a
    return torch.einsum("sk,skn->sn", a_rows.double(), b.double()[plan.expert_S])


def close(got, ref, tol=1e-5):
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err


def test_plain_with_gather_lora_bias_scale_and_scatter():
    from moetune.kernels import grouped_gemm

    plan, gen = problem()
    S, K, N, R = plan.num_rows, 40, 24, 3  # nothing a multiple of the tiles
    x, b = rand(gen, plan.num_tokens, K), rand(gen, 5, K, N)
    u, lb, bias, scale = rand(gen, S, R), rand(gen, 5, R, N), rand(gen, 5, N), rand(gen, S)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    out = grouped_gemm(x, b, a_index=plan.token_S, lora_u=u, lora_b=lb, bias=bias, alpha=0.5,
                       row_scale=scale, out_index=plan.perm_S, **common)
    ref = reference_rows(plan, x, b, plan.token_S) + torch.einsum("sr,srn->sn", u.double(), lb.double()[plan.expert_S])
    ref = (0.5 * ref + bias.double()[plan.expert_S]) * scale.double()[:, None]
    scattered = torch.empty_like(ref)
    scattered[plan.perm_S] = ref
    close(out, scattered)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("interleaved, act", [(False, SwiGLU()), (True, GptOssGLU(limit=1.5))])
def test_gated_forward_and_backward_epilogues(interleaved, act, split):
    from moetune.kernels import act_code, grouped_gemm
    from moetune.kernels.grouped_gemm import candidates_for

    plan, gen = problem(seed=1)
    S, K, I = plan.num_rows, 32, 20
    x, w1 = rand(gen, plan.num_tokens, K), rand(gen, 5, K, 2 * I)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    h, gu = grouped_gemm(x, w1, a_index=plan.token_S, epilogue=1, act=act_code(act), interleaved=interleaved, **common)
    gu_ref = reference_rows(plan, x, w1, plan.token_S)
    close(gu, gu_ref)
    close(h, act.forward(gu_ref, interleaved))

    # backward epilogue: d_gu = act'(gu) * (g * w) with g = d_out[token] @ W2[e]; dots = <act(gu), g>
    d_out, w2, w = rand(gen, plan.num_tokens, K), rand(gen, 5, K, I), rand(gen, S)
    configs = [c for c in candidates_for(2, S, 5, I, K) if c.get("SPLIT", False) == split]
    d_gu, dots = grouped_gemm(d_out, w2, a_index=plan.token_S, gu=gu, row_scale=w, epilogue=2,
                              act=act_code(act), interleaved=interleaved, config=configs[0], **common)
    g = reference_rows(plan, d_out, w2, plan.token_S)
    gu64 = gu.double()
    close(d_gu, act.backward(gu64, g * w.double()[:, None], interleaved))
    close(dots, (act.forward(gu64, interleaved) * g).sum(-1))


def with_persistent(configs):
    """Each config, then the same tile as a persistent kernel (autotuning's second step may pick it)."""
    return [variant for config in configs for variant in (config, dict(config, PERSISTENT=1))]


def fits(config, *args, **kwargs):
    """grouped_gemm(*args, config=config, **kwargs), or None where a persistent variant needs more shared memory than
    the GPU has (its flattened loop buffers more; autotuning drops such candidates: run 53h, 237,568 of 232,448
    bytes on an H200)."""
    from moetune.kernels import grouped_gemm

    try:
        return grouped_gemm(*args, config=config, **kwargs)
    except Exception as err:  # noqa: BLE001 - Triton's OutOfResources, raised at the first launch
        if config.get("PERSISTENT") and "OutOfResources" in type(err).__name__:
            return None
        raise


@pytest.fixture
def few_sms(monkeypatch):
    """Persistent launches over 3 SMs: each program then loops over many tiles, even on a large GPU."""
    module = importlib.import_module("moetune.kernels.grouped_gemm")
    monkeypatch.setattr(module, "multiprocessors", lambda device: 3)


PLAIN_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}  # several N blocks


def launch_case(case, plan, gen, N, E=5, interleaved_act=None):
    """(grouped_gemm kwargs, config) for the launch kinds the main-loop tests share, their extra inputs drawn from gen:
    sorted rows through TMA (scatter, row scale), the activation-gradient epilogue fused or split, the gated forward
    (concat gate/up as two TMA boxes and two accumulators, or interleaved pairs as one tile); nothing for others."""
    from moetune.kernels import act_code

    S = plan.num_rows
    kwargs, config = {}, dict(PLAIN_CONFIG)
    if case == "sorted_tma_rows":
        config.update(TMA_A=True, TMA_B=True)
        kwargs.update(out_index=plan.perm_S, row_scale=rand(gen, S))
    elif case.startswith("act_grad"):
        kwargs.update(gu=rand(gen, S, 2 * N), row_scale=rand(gen, S), epilogue=2, act=act_code(SwiGLU()))
        config.update(SPLIT=case.endswith("split"))
    elif case.startswith("gated"):
        interleaved = case == "gated_interleaved"
        act = interleaved_act if interleaved and interleaved_act is not None else SwiGLU()
        kwargs.update(epilogue=1, act=act_code(act), interleaved=interleaved, bias=rand(gen, E, 2 * N))
        config.update(TMA_B=case.endswith("tma"))
    return kwargs, config


@pytest.mark.parametrize("case", ["gathered", "sorted_tma_rows", "act_grad_fused", "act_grad_split", "gated_concat_tma",
                                  "gated_interleaved"])
def test_lora_input_computed_in_the_main_loop(case, monkeypatch):
    """lora_u_weight: U = s * A[a_row] @ UA[e] accumulated from the main loop's A tiles, written out once (by the
    first column block) and used in the same launch's epilogue: what a separate launch for U computes."""
    from moetune.kernels import grouped_gemm

    monkeypatch.setenv("MOETUNE_TRITON_TMA", "1")  # descriptors for the sorted-rows case in the interpreter
    plan, gen = problem(seed=9)
    S, K, N, R, s = plan.num_rows, 40, 36, 3, 0.5  # K and N tails for 16-wide tiles; three column blocks
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    gated = case.startswith("gated")
    ua, lb, b = rand(gen, 5, K, R), rand(gen, 5, R, 2 * N if gated else N), rand(gen, 5, K, 2 * N if gated else N)
    gathered = case != "sorted_tma_rows"
    a = rand(gen, plan.num_tokens, K) if gathered else rand(gen, S, K)
    a_index = plan.token_S if gathered else None
    kwargs, config = launch_case(case, plan, gen, N)
    u_out = torch.full((S, R), float("nan"), device=DEVICE)
    got = grouped_gemm(a, b, a_index=a_index, lora_u_weight=ua, lora_u_alpha=s, lora_u_out=u_out, lora_b=lb,
                       config=config, **common, **kwargs)
    u = grouped_gemm(a, ua, a_index=a_index, alpha=s, **common)  # the separate launch it replaces
    expected = grouped_gemm(a, b, a_index=a_index, lora_u=u, lora_b=lb, config=config, **common, **kwargs)
    u_ref = s * reference_rows(plan, a, ua, a_index)
    close(u_out, u_ref)
    close(u_out, u.double())
    for x, y in zip(got, expected) if isinstance(got, tuple) else [(got, expected)]:
        close(x, y.double())
    # lora_u_in_loop=False: the same through a launch for U first (the config is the main launch's)
    u_own = torch.full((S, R), float("nan"), device=DEVICE)
    own = grouped_gemm(a, b, a_index=a_index, lora_u_weight=ua, lora_u_alpha=s, lora_u_out=u_own, lora_b=lb,
                       lora_u_in_loop=False, config=config, **common, **kwargs)
    assert torch.equal(u_own, u)
    for x, y in zip(own, expected) if isinstance(own, tuple) else [(own, expected)]:
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="lora_u_weight: expected with lora_u_out and lora_b, and without lora_u"):
        grouped_gemm(a, b, a_index=a_index, lora_u=u, lora_u_weight=ua, lora_u_out=u_out, lora_b=lb, **common)


@pytest.mark.parametrize("case", ["gathered_lora_bias_scatter", "sorted_tma_rows", "act_grad_fused", "act_grad_split",
                                  "gated_concat_tma", "gated_interleaved", "u_in_loop"])
@pytest.mark.parametrize("routing", ["spread", "one_expert", "one_token"])
@pytest.mark.parametrize("sms", [3, 1000])
def test_persistent_programs_compute_what_one_tile_per_program_does(case, routing, sms, monkeypatch):
    """PERSISTENT: 1 or 2 programs per SM, each looping over many tiles (3 SMs) or some with none (1000 SMs), give
    bitwise the result of one tile per program, with empty experts, every row on one expert, and T = 1."""
    from moetune.kernels import grouped_gemm

    monkeypatch.setattr(importlib.import_module("moetune.kernels.grouped_gemm"), "multiprocessors", lambda d: sms)
    monkeypatch.setenv("MOETUNE_TRITON_TMA", "1")  # descriptors in the interpreter
    E = 5
    if routing == "spread":
        plan, gen = problem(seed=11)
    else:
        gen = torch.Generator().manual_seed(12)
        T = 1 if routing == "one_token" else 40
        ids = torch.tensor([[4, 1]]) if routing == "one_token" else torch.full((T, 1), 2)
        plan = plan_routing(ids.to(DEVICE), E)
    S, K, N, R = plan.num_rows, 40, 36, 3  # K and N tails for 16-wide tiles; three column blocks
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    gated = case.startswith("gated")
    b = rand(gen, E, K, 2 * N if gated else N)
    gathered = case != "sorted_tma_rows"
    a = rand(gen, plan.num_tokens, K) if gathered else rand(gen, S, K)
    kwargs, config = launch_case(case, plan, gen, N, E, interleaved_act=GptOssGLU(limit=1.5))
    kwargs["a_index"] = plan.token_S if gathered else None
    if case == "gathered_lora_bias_scatter":
        kwargs.update(lora_u=rand(gen, S, R), lora_b=rand(gen, E, R, N), bias=rand(gen, E, N), alpha=0.5,
                      row_scale=rand(gen, S), out_index=plan.perm_S)
    elif case == "u_in_loop":
        kwargs.update(lora_u_weight=rand(gen, E, K, R), lora_u_alpha=0.5, lora_b=rand(gen, E, R, N),
                      lora_u_in_loop=True)
    results = []
    for per_sm in (0, 1, 2):
        u_out = torch.full((S, R), float("nan"), device=DEVICE)
        extra = dict(lora_u_out=u_out) if case == "u_in_loop" else {}
        got = grouped_gemm(a, b, config=dict(config, PERSISTENT=per_sm), **common, **kwargs, **extra)
        results.append((got if isinstance(got, tuple) else (got,)) + ((u_out,) if extra else ()))
    reference = results[0]
    if case == "gathered_lora_bias_scatter":  # and against float64, not only against itself
        rows = reference_rows(plan, a, b, plan.token_S) + torch.einsum(
            "sr,srn->sn", kwargs["lora_u"].double(), kwargs["lora_b"].double()[plan.expert_S])
        rows = (0.5 * rows + kwargs["bias"].double()[plan.expert_S]) * kwargs["row_scale"].double()[:, None]
        scattered = torch.empty_like(rows)
        scattered[plan.perm_S] = rows
        close(reference[0], scattered)
    for got in results[1:]:
        for x, y in zip(got, reference):
            assert torch.equal(x, y)


def test_autotuning_then_tries_its_pick_as_a_persistent_kernel(monkeypatch, few_sms):
    """After the first step's pick, a second pick (PERSISTENT_TUNING) between that config and its persistent
    variants decides; its answer is the config launched. Only under MOETUNE_TRITON_PERSISTENT=1: unset (the
    default) or 0 skips the second step."""
    from moetune.kernels import autotune, grouped_gemm
    from moetune.kernels.grouped_gemm import PERSISTENT_TUNING, persistent_variants

    plan, gen = problem(seed=13)
    S, K, N = plan.num_rows, 40, 36
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    a, b = rand(gen, plan.num_tokens, K), rand(gen, 5, K, N)
    expected = grouped_gemm(a, b, a_index=plan.token_S, config=dict(PLAIN_CONFIG), **common)
    asked = []

    def pick(name, key, candidates, launch, device, num_rows, first_bonus_ms=0.0, host_ms=None):
        asked.append(name)
        if name != PERSISTENT_TUNING:
            return dict(PLAIN_CONFIG)
        assert candidates == persistent_variants(dict(PLAIN_CONFIG))
        assert [c.get("PERSISTENT", 0) for c in candidates] == [0, 1, 2]
        return candidates[2]

    module, launched = importlib.import_module("moetune.kernels.grouped_gemm"), []
    kernel = module.grouped_gemm_kernel

    class Spy:  # the grid and variant of each launch
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((grid, kwargs["PERSISTENT"]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(autotune, "pick", pick)
    monkeypatch.setattr(module, "grouped_gemm_kernel", Spy())
    monkeypatch.setenv("MOETUNE_TRITON_PERSISTENT", "1")
    got = grouped_gemm(a, b, a_index=plan.token_S, **common)
    assert asked == [module.TUNING, PERSISTENT_TUNING]
    assert launched == [((2 * 3,), True)]  # two programs on each of few_sms' 3 SMs, looping over the 21 tiles
    assert torch.equal(got, expected)
    for setting in ("0", None):
        asked.clear(), launched.clear()
        if setting is None:
            monkeypatch.delenv("MOETUNE_TRITON_PERSISTENT")
        else:
            monkeypatch.setenv("MOETUNE_TRITON_PERSISTENT", setting)
        grouped_gemm(a, b, a_index=plan.token_S, **common)
        assert asked == [module.TUNING] and launched[0][1] is False


def test_autotuning_on_hopper_then_tries_the_gluon_kernel_for_sorted_rows(monkeypatch):
    """Where gluon_candidates says yes (sm90 under MOETUNE_TRITON_GLUON=1, faked here) a third pick (GLUON_TUNING)
    between the pick so far and hopper_gemm's configs decides for a plain GEMM over sorted rows with its LoRA input
    given; a Gluon answer launches hopper_gemm.sorted_gemm with the launch's own operands. Gathered rows and
    gluon_candidates saying no skip the step."""
    from moetune.kernels import autotune, grouped_gemm, hopper_gemm
    from moetune.kernels.grouped_gemm import GLUON_TUNING, gluon_variants

    module = importlib.import_module("moetune.kernels.grouped_gemm")
    plan, gen = problem(seed=17)
    S, K, N, R = plan.num_rows, 40, 72, 8
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    a, b, u, lb = rand(gen, S, K), rand(gen, 5, K, N), rand(gen, S, R), rand(gen, 5, R, N)
    row_scale = rand(gen, S)
    asked, calls = [], []

    def pick(name, key, candidates, launch, device, num_rows, first_bonus_ms=0.0, host_ms=None):
        asked.append(name)
        if name != GLUON_TUNING:
            return dict(PLAIN_CONFIG)
        assert candidates == gluon_variants(dict(PLAIN_CONFIG)) and candidates[0] == PLAIN_CONFIG
        assert [c.get("GLUON", False) for c in candidates] == [False] + [True] * len(hopper_gemm.CONFIGS)
        assert host_ms(candidates[1]) == module.GLUON_HOST_MS and host_ms(candidates[0]) == 0.0
        return candidates[1]

    def sorted_gemm(a_, b_, offsets_E, counts_E, *, num_rows, tile_ends, lora_u, lora_b, lora_u_weight, lora_u_alpha,
                    alpha, bias, out, out_index, row_scale, config):
        calls.append(config)
        assert a_ is a and b_ is b and lora_u is expected_u and lora_b is lb and out_index is plan.perm_S
        assert lora_u_weight is expected_ua and (lora_u_weight is None or lora_u_alpha == 1.5)
        assert row_scale is expected_scale and alpha == 0.5 and bias is None and num_rows == S
        assert torch.equal(tile_ends, module.tile_schedule(counts_E, config["BLOCK_M"]))
        out.fill_(3.0)

    expected_scale, expected_u, expected_ua = row_scale, u, None
    supported = []
    monkeypatch.setattr(autotune, "pick", pick)
    monkeypatch.setattr(module, "gluon_candidates", lambda device, dtype: True)
    monkeypatch.setattr(hopper_gemm, "sorted_gemm_supported",
                        lambda *args, lora_u_weight=None: supported.append(lora_u_weight))
    monkeypatch.setattr(hopper_gemm, "sorted_gemm", sorted_gemm)
    got = grouped_gemm(a, b, lora_u=u, lora_b=lb, alpha=0.5, out_index=plan.perm_S, row_scale=row_scale, **common)
    assert asked == [module.TUNING, GLUON_TUNING] and supported == [None]
    assert calls == [dict(hopper_gemm.CONFIGS[0], GLUON=True)] and bool((got == 3.0).all())
    # The LoRA input in the main loop (v4): the same step, the factor and U's buffer handed to the Gluon kernel.
    asked.clear(), calls.clear(), supported.clear()
    ua, u_out = rand(gen, 5, K, R), torch.empty(S, R)
    expected_u, expected_ua = u_out, ua
    got = grouped_gemm(a, b, lora_u_weight=ua, lora_u_alpha=1.5, lora_u_out=u_out, lora_u_in_loop=True, lora_b=lb,
                       alpha=0.5, out_index=plan.perm_S, row_scale=row_scale, **common)
    assert asked == [module.TUNING, GLUON_TUNING] and supported == [ua]
    assert calls == [dict(hopper_gemm.CONFIGS[0], GLUON=True)] and bool((got == 3.0).all())
    asked.clear()
    grouped_gemm(a, b, a_index=plan.token_S[: plan.num_rows], lora_u=u, lora_b=lb, **common)  # gathered rows
    assert asked == [module.TUNING]
    monkeypatch.setattr(module, "gluon_candidates", lambda device, dtype: False)  # not Hopper, or turned off
    asked.clear()
    grouped_gemm(a, b, lora_u=u, lora_b=lb, **common)
    assert asked == [module.TUNING]


def lora_input_problem(seed: int):
    """A GEMM over gathered rows with its LoRA input's factor (K=40, N=36, rank 3): the plan, the generator,
    (S, K, N, R), the plan's keyword arguments and (a, b, ua, lb)."""
    plan, gen = problem(seed=seed)
    S, K, N, R = plan.num_rows, 40, 36, 3
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    operands = rand(gen, plan.num_tokens, K), rand(gen, 5, K, N), rand(gen, 5, K, R), rand(gen, 5, R, N)
    return plan, gen, (S, K, N, R), common, operands


def test_autotunings_decisions_are_memoised_per_launch_signature(monkeypatch):
    """A repeat of a launch signature asks autotune nothing (the LoRA input's way and the config are remembered) and
    computes the same; another row count, operand, environment switch or dtype is another signature and asks again.
    A caller's config is used as given and remembers nothing."""
    from moetune.kernels import autotune, grouped_gemm
    from moetune.kernels.grouped_gemm import LORA_INPUT_TUNING, TUNING

    module = importlib.import_module("moetune.kernels.grouped_gemm")
    plan, gen, (S, K, N, R), common, (a, b, ua, lb) = lora_input_problem(seed=19)
    asked, real_pick = [], autotune.pick

    def pick(name, key, candidates, launch, device, num_rows, first_bonus_ms=0.0, host_ms=None):
        asked.append(name)
        return real_pick(name, key, candidates, launch, device, num_rows, first_bonus_ms, host_ms)

    def in_loop_launch(plan=plan, ua=ua, lb=lb):
        u = torch.empty(plan.num_rows, ua.shape[2], device=DEVICE)
        out = grouped_gemm(a, b, offsets_E=plan.offsets_E, counts_E=plan.counts_E, num_rows=plan.num_rows,
                           a_index=plan.token_S, lora_u_weight=ua, lora_u_alpha=0.5, lora_u_out=u, lora_b=lb)
        return out, u

    monkeypatch.setattr(autotune, "pick", pick)
    first = in_loop_launch()
    assert asked == [LORA_INPUT_TUNING, TUNING]
    asked.clear()
    again = in_loop_launch()
    assert asked == [] and all(torch.equal(x, y) for x, y in zip(first, again))
    in_loop_launch(problem(T=17, seed=19)[0])  # another batch length
    assert asked == [LORA_INPUT_TUNING, TUNING]
    asked.clear()
    grouped_gemm(a, b, a_index=plan.token_S, **common)  # no LoRA input: another signature
    assert asked == [TUNING]
    asked.clear()
    monkeypatch.setenv("MOETUNE_TRITON_TMA", "1")  # the candidates change with the switch: decided again
    in_loop_launch()
    assert asked == [LORA_INPUT_TUNING, TUNING]
    monkeypatch.delenv("MOETUNE_TRITON_TMA")
    asked.clear()
    in_loop_launch(ua=rand(gen, 5, K, 2 * R), lb=rand(gen, 5, 2 * R, N))  # another rank: decided apart
    assert asked == [LORA_INPUT_TUNING, TUNING]
    asked.clear()
    config = module.candidates_for(0, S, 5, N, K)[-1]
    remembered = dict(module._decisions)
    grouped_gemm(a, b, a_index=plan.token_S, config=config, **common)
    grouped_gemm(a, b, a_index=plan.token_S, config=config, **common)
    assert asked == [] and module._decisions == remembered  # a caller's config is used as given
    grouped_gemm(a.half(), b.half(), a_index=plan.token_S, **common)
    assert asked == [TUNING]
    # The LoRA input by a launch of its own: the way is remembered too, and its two launches decide their own.
    module.forget_decisions()
    monkeypatch.setattr(module, "_LORA_INPUT_WAYS", ({"in_loop": False},))
    asked.clear()
    own = in_loop_launch()
    assert asked == [LORA_INPUT_TUNING, TUNING, TUNING]
    asked.clear()
    again = in_loop_launch()
    assert asked == [] and all(torch.equal(x, y) for x, y in zip(own, again))
    close(again[1], 0.5 * reference_rows(plan, a, ua, plan.token_S))


def test_the_gluon_step_checks_its_operands_at_every_launch(monkeypatch):
    """The Gluon step's eligibility (gluon_candidates) is remembered with the signature, but whether the kernel can
    read this launch's operands (alignment, strides) is asked again each time: a repeat whose output is not
    contiguous runs Triton's kernel."""
    from moetune.kernels import autotune, grouped_gemm, hopper_gemm
    from moetune.kernels.grouped_gemm import GLUON_TUNING

    module = importlib.import_module("moetune.kernels.grouped_gemm")
    plan, gen = problem(seed=21)
    S, K, N = plan.num_rows, 40, 72
    a, b = rand(gen, S, K), rand(gen, 5, K, N)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    asked, calls = [], []

    def pick(name, key, candidates, launch, device, num_rows, first_bonus_ms=0.0, host_ms=None):
        asked.append(name)
        return candidates[1] if name == GLUON_TUNING else dict(PLAIN_CONFIG)

    def supported(a_, b_, lora_u, lora_b, bias, out, out_index, row_scale, lora_u_weight=None):
        return None if out.stride(1) == 1 else "output columns not contiguous"

    def sorted_gemm(*args, out, config, **kwargs):
        calls.append(config)
        out.fill_(3.0)

    gluon_asked = []
    monkeypatch.setattr(autotune, "pick", pick)
    monkeypatch.setattr(module, "gluon_candidates", lambda device, dtype: gluon_asked.append(dtype) or True)
    monkeypatch.setattr(hopper_gemm, "sorted_gemm_supported", supported)
    monkeypatch.setattr(hopper_gemm, "sorted_gemm", sorted_gemm)
    for _ in range(2):
        got = grouped_gemm(a, b, **common)
        assert bool((got == 3.0).all())
    assert len(calls) == 2 and len(gluon_asked) == 1 and asked.count(GLUON_TUNING) == 2
    strided = torch.empty(N, S, device=DEVICE).t()  # the same signature, columns not contiguous
    got = grouped_gemm(a, b, out=strided, **common)
    assert len(calls) == 2 and asked.count(GLUON_TUNING) == 2
    close(got, reference_rows(plan, a, b))


def test_a_gluon_config_is_refused_where_the_gluon_kernel_cannot_compute_the_launch():
    """A GLUON config given by the caller (tests, benchmarks) is checked as the tuning step checks: gathered rows or
    a CPU tensor are one-line errors, not a plain GEMM over the wrong rows."""
    from moetune.kernels import grouped_gemm, hopper_gemm

    plan, gen = problem()
    a, b = rand(gen, plan.num_tokens, 16), rand(gen, 5, 16, 72)
    common = dict(num_rows=plan.num_rows, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    config = dict(hopper_gemm.CONFIGS[0], GLUON=True)
    with pytest.raises(ValueError, match="config: GLUON runs plain GEMMs over sorted rows only .epilogue 0"):
        grouped_gemm(a, b, a_index=plan.token_S, config=config, **common)
    with pytest.raises(ValueError, match="config: GLUON runs plain GEMMs over sorted rows only"):
        grouped_gemm(rand(gen, plan.num_rows, 16), b, config=config, **common)


def test_gluon_candidates_only_when_asked_and_on_hopper(monkeypatch):
    module = importlib.import_module("moetune.kernels.grouped_gemm")
    monkeypatch.setenv("MOETUNE_TRITON_GLUON", "1")
    assert module.gluon_candidates("cpu", torch.bfloat16) is False
    monkeypatch.setattr(module, "_capability", lambda index: (9, 0))
    for setting in ("0", None):  # off by default
        if setting is None:
            monkeypatch.delenv("MOETUNE_TRITON_GLUON")
        else:
            monkeypatch.setenv("MOETUNE_TRITON_GLUON", setting)
        assert module.gluon_candidates("cuda:0", torch.bfloat16) is False
    monkeypatch.setenv("MOETUNE_TRITON_GLUON", "1")
    expected = module.hopper_gemm.gluon is not None and torch.version.hip is None
    assert module.gluon_candidates("cuda:0", torch.bfloat16) is expected
    assert module.gluon_candidates("cuda:0", torch.float32) is False
    monkeypatch.setattr(module, "_capability", lambda index: (8, 0))
    assert module.gluon_candidates("cuda:0", torch.bfloat16) is False


def test_the_lora_input_goes_the_way_autotuning_measured_faster(monkeypatch):
    """lora_u_in_loop=None asks autotune.pick between the two ways (each run once here, as timing would) and
    follows its answer; below MIN_TUNE_ROWS or on CPU pick answers the first way, the main loop."""
    from moetune.kernels import autotune, grouped_gemm
    from moetune.kernels.grouped_gemm import LAUNCH_HOST_MS, LORA_INPUT_TUNING

    plan, gen, (S, K, N, R), common, (a, b, ua, lb) = lora_input_problem(seed=10)
    asked, real_pick = [], autotune.pick

    def pick(name, key, candidates, launch, device, num_rows, first_bonus_ms=0.0, host_ms=None):
        if name != LORA_INPUT_TUNING:
            return real_pick(name, key, candidates, launch, device, num_rows, first_bonus_ms, host_ms)
        assert candidates[0] == {"in_loop": True} and first_bonus_ms == LAUNCH_HOST_MS  # the launch it saves
        asked.append(key)
        for way in candidates:
            launch(way)
        launched.clear()
        return candidates[1]  # "measured" faster: U by a launch of its own

    module, launched = importlib.import_module("moetune.kernels.grouped_gemm"), []
    kernel = module.grouped_gemm_kernel

    class Spy:  # which kernel variant each launch after the choice runs
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["U_IN_LOOP"])
                return kernel[grid](*args, **kwargs)
            return launch

    expected = grouped_gemm(a, b, a_index=plan.token_S, lora_u_weight=ua, lora_u_alpha=0.5,
                            lora_u_out=torch.empty(S, R, device=DEVICE), lora_b=lb, lora_u_in_loop=False, **common)
    monkeypatch.setattr(autotune, "pick", pick)
    monkeypatch.setattr(module, "grouped_gemm_kernel", Spy())
    u = torch.full((S, R), float("nan"), device=DEVICE)
    got = grouped_gemm(a, b, a_index=plan.token_S, lora_u_weight=ua, lora_u_alpha=0.5, lora_u_out=u, lora_b=lb,
                       **common)
    assert launched == [False, False]  # U's own launch, then the GEMM reading it: the way pick answered
    assert len(asked) == 1 and asked[0][-2] == 16  # the rank, rounded up as the kernel's tile, in the key
    assert torch.equal(got, expected)
    close(u, 0.5 * reference_rows(plan, a, ua, plan.token_S))


def test_lora_input_in_the_loop_refuses_mismatched_buffers():
    from moetune.kernels import grouped_gemm

    plan, gen = problem(seed=10)
    S, K, N, R = plan.num_rows, 40, 24, 3
    a, b, ua, lb = rand(gen, plan.num_tokens, K), rand(gen, 5, K, N), rand(gen, 5, K, R), rand(gen, 5, R, N)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E, a_index=plan.token_S)
    out = torch.empty(S, R, device=DEVICE)
    for kwargs, message in (
        (dict(lora_u_weight=ua, lora_u_out=out[:-1], lora_b=lb), r"lora_u_out: expected \[num_rows=\d+, R=3\]"),
        (dict(lora_u_weight=ua, lora_u_out=out.half(), lora_b=lb), "lora_u_out: expected"),
        (dict(lora_u_weight=ua[:, :-1], lora_u_out=out, lora_b=lb), r"lora_u_weight: expected \[E=5, K=40, R\]"),
        (dict(lora_u_weight=ua[0], lora_u_out=out, lora_b=lb), r"lora_u_weight: expected \[E=5, K=40, R\]"),
        (dict(lora_u_weight=ua, lora_u_out=out, lora_b=lb[:, :2]), "lora_b: expected rank 3"),
        (dict(lora_u_out=out, lora_u=out, lora_b=lb), "lora_u_out: expected only with lora_u_weight"),
        (dict(lora_u=out, lora_b=lb, lora_u_in_loop=True), "lora_u_in_loop: expected only with lora_u_weight"),
    ):
        with pytest.raises(ValueError, match=message):
            grouped_gemm(a, b, **kwargs, **common)


def test_gated_concat_weight_whose_up_columns_are_not_16_byte_aligned_loads_through_pointers(monkeypatch):
    """A [E, K, 2N] concat weight with N * 2 bytes not a multiple of 16: the up columns' TMA box would start
    misaligned, so the launcher reads that weight through pointers (fp16, N = 36)."""
    from moetune.kernels import act_code, grouped_gemm

    monkeypatch.setenv("MOETUNE_TRITON_TMA", "1")
    plan, gen = problem(seed=11)
    S, K, N = plan.num_rows, 64, 36
    x, w1 = rand(gen, S, K).half(), rand(gen, 5, K, 2 * N).half()
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    config = dict(TMA_CONFIG, TMA_A=True)
    h, gu = grouped_gemm(x, w1, epilogue=1, act=act_code(SwiGLU()), config=config, **common)
    close(gu, reference_rows(plan, x, w1), tol=1e-3)


def wgrad_case(mode, plan, gen, M, N, make=rand):
    """(kwargs for grouped_wgrad, a_rows, b_rows): one mode of the launch and its operands row by row."""
    from moetune.kernels import act_code

    S, act = plan.num_rows, SwiGLU()
    if mode == "plain":
        a, b = make(gen, S, M), make(gen, S, N)
        return dict(a=a, b=b, alpha=2.0), 2.0 * a.double(), b.double()
    if mode == "gather_a_scale":
        a, b, scale = make(gen, plan.num_tokens, M), make(gen, S, N), make(gen, S)
        return (dict(a=a, b=b, a_index=plan.token_S, scale=scale), a.double()[plan.token_S],
                b.double() * scale.double()[:, None])
    if mode == "gather_b":
        a, b = make(gen, S, M), make(gen, plan.num_tokens, N)
        return dict(a=a, b=b, b_index=plan.token_S), a.double(), b.double()[plan.token_S]
    interleaved = mode == "act_b_interleaved"  # gpt-oss's (gate, up) pairs, clamped
    act = GptOssGLU(limit=1.5) if interleaved else act
    a, gu = make(gen, S, M), make(gen, S, 2 * N)
    return (dict(a=a, b=gu, b_act=act_code(act), interleaved=interleaved), a.double(),
            act.forward(gu.double(), interleaved))


def wgrad_reference(plan, E, a_rows, b_rows):
    ref = torch.zeros(E, a_rows.shape[1], b_rows.shape[1], dtype=torch.float64, device=a_rows.device)
    return ref.index_add_(0, plan.expert_S, torch.einsum("sm,sn->smn", a_rows, b_rows))


@pytest.mark.parametrize("mode", ["plain", "gather_a_scale", "gather_b", "act_b", "act_b_interleaved"])
def test_wgrad_modes_and_empty_experts(mode):
    """Each mode against float64, with every candidate config autotuning may pick (the interpreter runs them all)."""
    from moetune.kernels import grouped_wgrad
    from moetune.kernels.grouped_wgrad import wgrad_candidates

    plan, gen = problem(seed=2)
    S, M, N = plan.num_rows, 17, 12
    kwargs, a_rows, b_rows = wgrad_case(mode, plan, gen, M, N)
    ref = wgrad_reference(plan, 5, a_rows, b_rows)
    configs = wgrad_candidates(M, N, S, 5)
    assert len(configs) >= 3
    for config in (None, *configs):
        out = grouped_wgrad(num_rows=S, offsets_E=plan.offsets_E, config=config, **kwargs)
        close(out, ref)
        assert out[3].abs().sum() == 0  # the empty expert


@pytest.mark.parametrize("mode", ["plain", "gather_a_scale", "gather_b", "act_b", "act_b_interleaved"])
def test_wgrad_over_several_blocks(mode):
    """Several M and N blocks (16-wide blocks over 40 columns, tails included): each block's offsets, the
    interleaved pairs' included."""
    from moetune.kernels import grouped_wgrad

    plan, gen = problem(seed=9)
    kwargs, a_rows, b_rows = wgrad_case(mode, plan, gen, 40, 40)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    out = grouped_wgrad(num_rows=plan.num_rows, offsets_E=plan.offsets_E, config=config, **kwargs)
    close(out, wgrad_reference(plan, 5, a_rows, b_rows))


def busy_expert_problem(E, T, k, seed=0):
    """Every token routes its first slot to expert 0 (the rest distinct, at random), expert E - 1 gets none."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(E - 2, generator=gen)[:k - 1]])
                       for _ in range(T)])
    return plan_routing(ids.to(DEVICE), E), gen


@pytest.mark.parametrize("mode", ["plain", "gather_a_scale", "gather_b", "act_b", "act_b_interleaved"])
def test_wgrad_split_into_chunks_of_each_expert(mode, monkeypatch):
    """Chunks of 8 rows: experts of several chunks (partials summed by the last program), of one, and the empty
    expert's one empty chunk (zeros), with every candidate config; counts_E given or not."""
    from moetune.kernels import grouped_wgrad
    from moetune.kernels.grouped_wgrad import wgrad_candidates

    monkeypatch.setattr(importlib.import_module("moetune.kernels.grouped_wgrad"), "chunk_rows", lambda S, E: 8)
    plan, gen = busy_expert_problem(E=6, T=29, k=2)
    counts = plan.counts_E.tolist()
    assert counts[0] == 29 and counts[5] == 0 and min(counts[1:5]) <= 8 < max(counts[1:5])
    S, M, N = plan.num_rows, 17, 12
    kwargs, a_rows, b_rows = wgrad_case(mode, plan, gen, M, N)
    ref = wgrad_reference(plan, 6, a_rows, b_rows)
    for config in (None, *wgrad_candidates(M, N, S, 6)):
        for counts_E in (None, plan.counts_E):
            out = grouped_wgrad(num_rows=S, offsets_E=plan.offsets_E, counts_E=counts_E, config=config, **kwargs)
            close(out, ref)
            assert out[5].abs().sum() == 0  # the empty expert


def test_wgrad_launches_of_one_backward_share_counters_left_at_zero(monkeypatch):
    """The split's arrival counters are made once per set of counts: every launch sets each block's counter back to
    zero when it has summed the block, so the next launch (another config, other M and N) finds them zero."""
    from moetune.kernels import grouped_wgrad
    from moetune.kernels.grouped_wgrad import wgrad_candidates

    module = importlib.import_module("moetune.kernels.grouped_wgrad")
    monkeypatch.setattr(module, "chunk_rows", lambda S, E: 8)
    given, arrival_counters = [], module.arrival_counters
    monkeypatch.setattr(module, "arrival_counters", lambda *args: given.append(arrival_counters(*args)) or given[-1])
    plan, gen = busy_expert_problem(E=6, T=29, k=2)
    for M, N in ((17, 12), (12, 40)):
        kwargs, a_rows, b_rows = wgrad_case("gather_a_scale", plan, gen, M, N)
        ref = wgrad_reference(plan, 6, a_rows, b_rows)
        for config in wgrad_candidates(M, N, plan.num_rows, 6):
            close(grouped_wgrad(num_rows=plan.num_rows, offsets_E=plan.offsets_E, counts_E=plan.counts_E,
                                config=config, **kwargs), ref)
            assert given[-1].abs().sum() == 0
    assert len(given) >= 6
    # one fill, and one more only where a launch needs more counters than the first
    assert len({id(counters) for counters in given}) <= 2


def plan_of_counts(counts, seed=0):
    """A plan whose experts get exactly these row counts (one slot a token, tokens in random order)."""
    ids = torch.cat([torch.full((c,), e) for e, c in enumerate(counts)]).long()
    gen = torch.Generator().manual_seed(seed)
    return plan_routing(ids[torch.randperm(len(ids), generator=gen)].view(-1, 1).to(DEVICE), len(counts)), gen


@pytest.mark.parametrize("counts", [[0, 17, 0, 8, 9, 0], [0, 0, 33], [33, 0, 0], [1, 16, 7, 0, 24], [8], [9], [0]])
def test_wgrad_split_with_empty_experts_anywhere(counts, monkeypatch):
    """Chunks of 8 rows: empty experts first, between and last, experts of exactly one chunk (8 rows) and one past
    it (9), a lone expert; per expert against float64, the schedule's slab places (only experts of several chunks)."""
    from moetune.kernels import grouped_wgrad

    module = importlib.import_module("moetune.kernels.grouped_wgrad")
    monkeypatch.setattr(module, "chunk_rows", lambda S, E: 8)
    plan, gen = plan_of_counts(counts)
    kwargs, a_rows, b_rows = wgrad_case("gather_a_scale", plan, gen, 17, 12)
    ref = wgrad_reference(plan, len(counts), a_rows, b_rows)
    out = grouped_wgrad(num_rows=plan.num_rows, offsets_E=plan.offsets_E, counts_E=plan.counts_E, **kwargs)
    for e, c in enumerate(counts):
        if c:
            close(out[e], ref[e])
        else:
            assert out[e].abs().sum() == 0
    chunks = [max(1, -(-c // 8)) for c in counts]
    schedule = module.chunk_schedule(plan.counts_E, 8, True).tolist()
    assert schedule[0] == list(itertools.accumulate(chunks))
    assert schedule[1] == list(itertools.accumulate(n if n > 1 else 0 for n in chunks))
    assert module.chunk_schedule(plan.offsets_E, 8, False).tolist() == schedule  # from the offsets, the same


def test_wgrad_splits_a_busy_expert_at_its_own_chunk_size():
    """Without a stand-in chunk size: one expert takes every token, 1100 rows against chunks of 512 (twice the
    mean of 138 rows per expert, rounded up to a power of two); several M and N blocks, their tails included."""
    from moetune.kernels import grouped_wgrad
    from moetune.kernels.grouped_wgrad import chunk_rows

    plan, gen = busy_expert_problem(E=16, T=1100, k=2, seed=3)
    assert chunk_rows(plan.num_rows, 16) == 512 and plan.counts_E[0] == 1100
    kwargs, a_rows, b_rows = wgrad_case("gather_a_scale", plan, gen, 40, 24)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}
    out = grouped_wgrad(num_rows=plan.num_rows, offsets_E=plan.offsets_E, config=config, **kwargs)
    close(out, wgrad_reference(plan, 16, a_rows, b_rows))
    assert out[15].abs().sum() == 0


def test_wgrad_chunk_rows(monkeypatch):
    """About twice the mean rows per expert, a power of two, at least 256: even routing gives one chunk an expert.
    SPLIT_ROWS off: one chunk holds every row (each expert one program, the kernel before the split)."""
    module = importlib.import_module("moetune.kernels.grouped_wgrad")

    assert module.chunk_rows(131072, 128) == 2048   # Qwen3-30B-A3B at 16K tokens: a mean of 1024 rows
    assert module.chunk_rows(32768, 128) == 512     # at 4K
    assert module.chunk_rows(32768, 32) == 2048     # gpt-oss-20b at 8K
    assert module.chunk_rows(100, 8) == module.chunk_rows(0, 8) == module.chunk_rows(5, 0) == 256
    monkeypatch.setattr(module, "SPLIT_ROWS", False)
    assert module.chunk_rows(131072, 128) == 131072 and module.chunk_rows(100, 8) == 256


def test_wgrad_candidates_widen_the_wide_side():
    """The rank side keeps one block; the wide side (H or I) is tried up to 256 columns wide."""
    from moetune.kernels.grouped_wgrad import wgrad_candidates

    for M, N, wide, rank in ((2048, 16, "BLOCK_M", "BLOCK_N"), (16, 768, "BLOCK_N", "BLOCK_M")):
        configs = wgrad_candidates(M, N, 131072, 128)
        assert {c[rank] for c in configs} == {16}
        assert max(c[wide] for c in configs) == 256 and configs[0][wide] < 256


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["plain", "gather_a_scale", "gather_b", "act_b", "act_b_interleaved"])
@pytest.mark.parametrize("wide", ["M", "N"])
def test_every_wgrad_candidate_in_bf16_on_gpu(mode, wide):
    """Autotuning may pick any wgrad candidate: each one against float64 in bf16, the wide side not a multiple of
    any block (and the rank side 16)."""
    from moetune.kernels import grouped_wgrad
    from moetune.kernels.grouped_wgrad import wgrad_candidates

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    E, T, k = 8, 700, 4
    gen = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    plan = plan_routing(ids.cuda(), E)
    M, N = (333, 16) if wide == "M" else (16, 333)
    kwargs, a_rows, b_rows = wgrad_case(mode, plan, gen, M, N, make=bf16_cuda)
    ref = wgrad_reference(plan, E, a_rows, b_rows)
    for config in wgrad_candidates(M, N, plan.num_rows, E):
        close(grouped_wgrad(num_rows=plan.num_rows, offsets_E=plan.offsets_E, config=config, **kwargs), ref, tol=1e-2)


def bf16_cuda(gen, *shape):
    return torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["plain", "gather_a_scale", "gather_b", "act_b", "act_b_interleaved"])
@pytest.mark.parametrize("wide", ["M", "N"])
def test_wgrad_split_in_bf16_on_gpu_is_deterministic(mode, wide):
    """One expert takes every token (3000 rows in chunks of 512, summed by whichever program is last), in bf16 with
    every candidate config: against float64, and two launches the same to the bit."""
    from moetune.kernels import grouped_wgrad
    from moetune.kernels.grouped_wgrad import chunk_rows, wgrad_candidates

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    plan, gen = busy_expert_problem(E=64, T=3000, k=4, seed=5)
    assert chunk_rows(plan.num_rows, 64) == 512
    M, N = (333, 16) if wide == "M" else (16, 333)
    kwargs, a_rows, b_rows = wgrad_case(mode, plan, gen, M, N, make=bf16_cuda)
    ref = wgrad_reference(plan, 64, a_rows, b_rows)
    for config in wgrad_candidates(M, N, plan.num_rows, 64):
        first, second = (grouped_wgrad(num_rows=plan.num_rows, offsets_E=plan.offsets_E, counts_E=plan.counts_E,
                                       config=config, **kwargs) for _ in range(2))
        close(first, ref, tol=1e-2)
        assert torch.equal(first, second)
        assert first[63].abs().sum() == 0


def test_split_config_is_refused_outside_the_activation_gradient_epilogue():
    from moetune.kernels import grouped_gemm

    plan, gen = problem()
    x, b = rand(gen, plan.num_tokens, 8), rand(gen, 5, 8, 8)
    config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "SPLIT": True}
    with pytest.raises(ValueError, match="config: SPLIT applies to the activation-gradient epilogue"):
        grouped_gemm(x, b, plan.offsets_E, plan.counts_E, num_rows=plan.num_rows, a_index=plan.token_S, config=config)


TMA_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "TMA_B": True}


@pytest.fixture
def doubled_tma(monkeypatch):
    """Descriptors built over twice the operand they are asked for: a kernel that reads through TMA gives twice
    that operand's product, one that silently falls back to pointer loads does not. Counts what was built."""
    import importlib

    module = importlib.import_module("moetune.kernels.grouped_gemm")
    if module.TensorDescriptor is None:
        pytest.skip("this Triton has no host TMA descriptors")
    weight_descriptor, rows_descriptor = module.weight_descriptor, module.rows_descriptor
    built = {"weight": 0, "rows": 0}

    def doubled_weight(b, block_n, block_k, column_offset=0):
        mode, desc = weight_descriptor(2 * b, block_n, block_k, column_offset)  # 2 * b keeps b's strides (its layout)
        built["weight"] += mode != 0
        return mode, desc

    def doubled_rows(a, K, block_m, block_k):
        desc = rows_descriptor(2 * a, K, block_m, block_k)
        built["rows"] += desc is not None
        return desc

    monkeypatch.setattr(module, "weight_descriptor", doubled_weight)
    monkeypatch.setattr(module, "rows_descriptor", doubled_rows)
    return built


@pytest.mark.parametrize("layout", ["k_contiguous", "n_contiguous"])
def test_weight_through_tma_descriptors(layout, doubled_tma):
    """The TMA path for the weight in the plain GEMM: both weight layouts, tails in K and N (boxes past an expert's rows read the next expert's, which the masks must neutralise)."""
    from moetune.kernels import grouped_gemm
    from moetune.kernels.grouped_gemm import weight_descriptor

    plan, gen = problem(seed=3)
    S, K, N, R = plan.num_rows, 40, 24, 3  # tails for 16-wide tiles; rows 16-byte aligned in fp32
    x = rand(gen, plan.num_tokens, K)
    if layout == "k_contiguous":  # a transposed view of an [E, N, K] weight (gate_up and down forward)
        b = rand(gen, 5, N, K).transpose(1, 2)
    else:  # a contiguous [E, K, N] weight (the backward's dgrad)
        b = rand(gen, 5, K, N)
    mode, _ = weight_descriptor(b, 16, 16)
    assert mode == (1 if layout == "k_contiguous" else 2)
    doubled_tma["weight"] = 0
    u, lb, bias, scale = rand(gen, S, R), rand(gen, 5, R, N), rand(gen, 5, N), rand(gen, S)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    out = grouped_gemm(x, b, a_index=plan.token_S, lora_u=u, lora_b=lb, bias=bias, alpha=0.5,
                       row_scale=scale, out_index=plan.perm_S, config=TMA_CONFIG, **common)
    assert doubled_tma == {"weight": 1, "rows": 0}
    ref = 2 * reference_rows(plan, x, b, plan.token_S) + torch.einsum("sr,srn->sn", u.double(), lb.double()[plan.expert_S])
    ref = (0.5 * ref + bias.double()[plan.expert_S]) * scale.double()[:, None]
    scattered = torch.empty_like(ref)
    scattered[plan.perm_S] = ref
    close(out, scattered)


@pytest.mark.parametrize("layout", ["k_contiguous", "n_contiguous"])
@pytest.mark.parametrize("interleaved, act", [(False, SwiGLU()), (True, GptOssGLU(limit=1.5))])
def test_tma_gated_forward_and_backward_epilogues(interleaved, act, layout, doubled_tma):
    """TMA weight loads in the gated epilogues: concat gate/up as two boxes (two accumulators), interleaved pairs
    as one box twice as wide, in both weight layouts, with LoRA and bias; then the fused and the split activation
    gradient."""
    from moetune.kernels import act_code, grouped_gemm
    from moetune.kernels.grouped_gemm import candidates_for

    plan, gen = problem(seed=4)
    S, K, I, R = plan.num_rows, 40, 20, 3  # tails for 16-wide tiles in K and in the h columns
    x = rand(gen, plan.num_tokens, K)
    if layout == "k_contiguous":  # Qwen3's gate_up [E, 2I, K], read transposed
        w1 = rand(gen, 5, 2 * I, K).transpose(1, 2)
    else:  # gpt-oss's gate_up [E, K, 2I]
        w1 = rand(gen, 5, K, 2 * I)
    u, lb, bias = rand(gen, S, R), rand(gen, 5, R, 2 * I), rand(gen, 5, 2 * I)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    h, gu = grouped_gemm(x, w1, a_index=plan.token_S, lora_u=u, lora_b=lb, bias=bias, alpha=0.5, epilogue=1,
                         act=act_code(act), interleaved=interleaved, config=TMA_CONFIG, **common)
    assert doubled_tma["weight"] == 1
    lora = torch.einsum("sr,srn->sn", u.double(), lb.double()[plan.expert_S])
    gu_ref = 0.5 * (2 * reference_rows(plan, x, w1, plan.token_S) + lora) + bias.double()[plan.expert_S]
    close(gu, gu_ref)
    close(h, act.forward(gu_ref, interleaved))

    d_out, w = rand(gen, plan.num_tokens, K), rand(gen, S)
    w2 = rand(gen, 5, I, K).transpose(1, 2) if layout == "k_contiguous" else rand(gen, 5, K, I)
    g = 2 * reference_rows(plan, d_out, w2, plan.token_S)
    split = next(c for c in candidates_for(2, S, 5, I, K) if c.get("SPLIT"))
    for built, config in enumerate((TMA_CONFIG, dict(split, TMA_B=True)), start=2):
        d_gu, dots = grouped_gemm(d_out, w2, a_index=plan.token_S, gu=gu, row_scale=w, epilogue=2,
                                  act=act_code(act), interleaved=interleaved, config=config, **common)
        assert doubled_tma["weight"] == built
        close(d_gu, act.backward(gu.double(), g * w.double()[:, None], interleaved))
        close(dots, (act.forward(gu.double(), interleaved) * g).sum(-1))


@pytest.mark.parametrize("layout", ["k_contiguous", "n_contiguous"])
@pytest.mark.parametrize("N", [24, 12], ids=["wide", "rank_wide"])
def test_sorted_rows_through_tma_descriptors(N, layout, doubled_tma):
    """Activations through TMA (plain GEMMs over sorted rows, no gather): boxes past an expert's rows read the
    next expert's, which must never be stored; the weight through TMA too where it is wider than a LoRA rank, in
    both layouts (the down projection's [E, K, N] weight reads the next expert's rows past K: A must be zero there,
    even when A is wider than K)."""
    from moetune.kernels import grouped_gemm
    from moetune.kernels.grouped_gemm import candidates_for

    plan, gen = problem(seed=6)
    S, K, R = plan.num_rows, 40, 3
    wide = rand(gen, S, K + 8)  # A wider than K: its first K columns are the operand
    h = wide[:, :K]
    b = rand(gen, 5, N, K).transpose(1, 2) if layout == "k_contiguous" else rand(gen, 5, K, N)
    u, lb, scale = rand(gen, S, R), rand(gen, 5, R, N), rand(gen, S)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    config = dict(TMA_CONFIG, TMA_A=True, TMA_B=N > 16)
    out = grouped_gemm(wide, b, lora_u=u, lora_b=lb, row_scale=scale, out_index=plan.perm_S, config=config, **common)
    assert doubled_tma == {"weight": int(N > 16), "rows": 1}
    ref = 2 ** (1 + (N > 16)) * reference_rows(plan, h, b)
    ref = (ref + torch.einsum("sr,srn->sn", u.double(), lb.double()[plan.expert_S])) * scale.double()[:, None]
    scattered = torch.empty_like(ref)
    scattered[plan.perm_S] = ref
    close(out, scattered)
    assert any(c.get("TMA_A") for c in candidates_for(0, S, 5, 128, K, True, False))
    assert not any(c.get("TMA_A") for c in candidates_for(0, S, 5, 128, K, True, True))  # gathered rows
    assert not any(c.get("TMA_A") for c in candidates_for(0, S, 5, 16, K, True, False))  # a LoRA product


def test_descriptors_refuse_what_tma_cannot_read():
    """Where TMA cannot read an operand the launcher gets no descriptor and loads through pointers."""
    from moetune.kernels.grouped_gemm import TensorDescriptor, rows_descriptor, weight_descriptor

    if TensorDescriptor is None:
        pytest.skip("this Triton has no host TMA descriptors")
    gen = torch.Generator().manual_seed(8)
    b = rand(gen, 5, 24, 40).transpose(1, 2)  # K = 40, N = 24: 16-byte rows in fp32
    assert weight_descriptor(b, 16, 16)[0] == 1
    assert weight_descriptor(rand(gen, 5, 7, 5).transpose(1, 2), 16, 16) == (0, None)  # 28-byte rows
    assert weight_descriptor(rand(gen, 5 * 24 * 40 + 1)[1:].view(5, 24, 40).transpose(1, 2), 16, 16) == (0, None)  # base
    assert weight_descriptor(b, 512, 16) == (0, None)  # a box over TMA's 256
    a = rand(gen, 30, 48)
    assert rows_descriptor(a, 40, 16, 16) is not None
    assert rows_descriptor(rand(gen, 30 * 48 + 4)[4:].view(30, 48), 40, 16, 16) is not None  # 16-byte offset: fine
    assert rows_descriptor(rand(gen, 30 * 48 + 1)[1:].view(30, 48), 40, 16, 16) is None  # unaligned base, aligned pitch
    assert rows_descriptor(a[:, 1:], 40, 16, 16) is None  # unaligned base and pitch
    assert rows_descriptor(a, 56, 16, 16) is None  # narrower than K
    assert rows_descriptor(a, 40, 512, 16) is None  # a box over 256


@pytest.mark.parametrize("per_expert", [47.9, 48, 255.9, 256, 512, 512.5])
def test_candidates_keep_the_thresholds_of_candidate_blocks(per_expert):
    """candidates_for is memoised per class of rows per expert: each class gives the blocks of its own rows."""
    from moetune.kernels.grouped_gemm import candidate_blocks, candidates_for

    E = 10
    num_rows = round(per_expert * E)
    for epilogue in (0, 1):
        got = candidates_for(epilogue, num_rows, E, 768, 2048)
        assert list(got) == candidate_blocks(num_rows / E, 768, 2048, gated=epilogue == 1)


def test_tma_candidates_on_hopper_or_when_asked(monkeypatch):
    from moetune.kernels.grouped_gemm import TensorDescriptor, candidates_for, tma_candidates

    monkeypatch.setenv("MOETUNE_TRITON_TMA", "0")
    assert not tma_candidates("cuda")
    monkeypatch.delenv("MOETUNE_TRITON_TMA")
    assert not tma_candidates("cpu")  # no TMA on the CPU unless forced (the interpreter's tests)
    if TensorDescriptor is not None:  # the GPU's answer, with a fake compute capability
        import importlib

        module = importlib.import_module("moetune.kernels.grouped_gemm")
        monkeypatch.setattr(module, "_capability", lambda index: (9, 0))
        assert tma_candidates("cuda") and tma_candidates("cuda:1", torch.bfloat16)
        assert not tma_candidates("cuda", torch.float32)
        assert not tma_candidates("cuda", torch.float16)  # only bfloat16 was measured and GPU-tested
        monkeypatch.setattr(torch.version, "hip", "6.4")
        assert not tma_candidates("cuda")  # ROCm: no NVIDIA TMA
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(module, "_capability", lambda index: (8, 0))
        assert not tma_candidates("cuda")  # Ampere: no TMA
    monkeypatch.setenv("MOETUNE_TRITON_TMA", "1")
    assert tma_candidates("cpu", torch.float32) == (TensorDescriptor is not None)
    assert not any(c.get("TMA_B") for c in candidates_for(0, 65536, 128, 2048, 768))
    for epilogue in (0, 1, 2):
        configs = candidates_for(epilogue, 65536, 128, 2048, 768, True)
        assert any(c.get("TMA_B") for c in configs) and not configs[0].get("TMA_B")  # the heuristic pick first
    assert not any(c.get("TMA_B") for c in candidates_for(0, 65536, 128, 16, 2048, True))  # rank-wide LoRA products


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["dgrad_sorted", "act_grad_gathered", "gated_gathered"])
def test_every_candidate_with_the_lora_input_in_the_loop_in_bf16_on_gpu(launch, few_sms):
    """lora_u_weight on the GPU (TMA candidates included on sm90+): U and the output of each candidate against
    float64, for the launches the backend may run this way (the down projection, forward and backward, is a plain
    GEMM over sorted or gathered rows like dgrad_sorted; the gate_up forward is gated_gathered)."""
    from moetune.kernels import act_code
    from moetune.kernels.grouped_gemm import candidates_for, tma_candidates

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    E, K, N, R, T, k, s = 8, 320, 200, 16, 700, 4, 2.0
    gen = torch.Generator().manual_seed(6)
    plan = plan_routing(torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).cuda(), E)
    S = plan.num_rows
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)

    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)

    gated = launch == "gated_gathered"
    ua, lb = bf16(E, K, R, scale=0.1), bf16(E, R, 2 * N if gated else N, scale=0.1)
    gathered = launch != "dgrad_sorted"
    if gated:  # concat [E, 2N, K] as moetune stores gate_up, viewed [E, K, 2N]
        a, b = bf16(T, K), bf16(E, 2 * N, K).transpose(1, 2)
    else:
        a, b = (bf16(T, K), bf16(E, K, N)) if gathered else (bf16(S, K), bf16(E, N, K).transpose(1, 2))
    a_index = plan.token_S if gathered else None
    u_ref = s * reference_rows(plan, a, ua, a_index)
    y_ref = reference_rows(plan, a, b, a_index)
    extra, epilogue = {}, 0
    if launch == "act_grad_gathered":
        act, gu, w = SwiGLU(), bf16(S, 2 * N), bf16(S)
        extra, epilogue = dict(gu=gu, row_scale=w, epilogue=2, act=act_code(act)), 2
    elif gated:
        act = SwiGLU()
        extra, epilogue = dict(epilogue=1, act=act_code(act)), 1
    for config in with_persistent(candidates_for(epilogue, S, E, N, K, tma_candidates("cuda"), gathered)):
        u = torch.full((S, R), float("nan"), device="cuda", dtype=torch.bfloat16)
        out = fits(config, a, b, a_index=a_index, lora_u_weight=ua, lora_u_alpha=s, lora_u_out=u, lora_b=lb,
                   **extra, **common)
        if out is None:
            continue
        close(u, u_ref, tol=1e-2)
        g = y_ref + torch.einsum("sr,srn->sn", u.double(), lb.double()[plan.expert_S])
        if gated:
            h, gu = out
            close(gu, g, tol=1e-2)
            close(h, act.forward(gu.double(), False), tol=2e-2)
        elif gathered:
            d_gu, dots = out
            close(d_gu, act.backward(gu.double(), g * w.double()[:, None], False), tol=2e-2)
            close(dots, (act.forward(gu.double(), False) * g).sum(-1), tol=2e-2)
        else:
            close(out, g, tol=1e-2)


@pytest.mark.gpu
def test_the_lora_input_way_is_measured_on_gpu():
    """lora_u_in_loop=None from MIN_TUNE_ROWS rows: both ways timed once (the first time: ~20 configs compiled) and
    the choice cached with the configs; either way gives the result of the other."""
    from moetune.kernels import autotune, grouped_gemm
    from moetune.kernels.grouped_gemm import LORA_INPUT_TUNING

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    E, K, N, R, k = 8, 320, 200, 16, 4
    T = autotune.MIN_TUNE_ROWS // k
    gen = torch.Generator().manual_seed(7)
    plan = plan_routing(torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).cuda(), E)
    common = dict(num_rows=plan.num_rows, offsets_E=plan.offsets_E, counts_E=plan.counts_E)

    def bf16(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)

    a, b, ua, lb = bf16(T, K), bf16(E, K, N), bf16(E, K, R, scale=0.1), bf16(E, R, N, scale=0.1)
    outs = {}
    for way in (None, True, False):
        u = torch.empty(plan.num_rows, R, device="cuda", dtype=torch.bfloat16)
        outs[way] = (grouped_gemm(a, b, a_index=plan.token_S, lora_u_weight=ua, lora_u_alpha=2.0, lora_u_out=u,
                                  lora_b=lb, lora_u_in_loop=way, **common), u)
    this_shape = f"(0, False, True, True, False, {N}, {K}, 'torch.bfloat16'"
    assert [key for key in autotune._load() if f"|{LORA_INPUT_TUNING}|" in key and this_shape in key]
    ref = reference_rows(plan, a, b, plan.token_S)
    for out, u in outs.values():
        close(u, 2.0 * reference_rows(plan, a, ua, plan.token_S), tol=1e-2)
        close(out, ref + torch.einsum("sr,srn->sn", u.double(), lb.double()[plan.expert_S]), tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["plain_k_contiguous", "plain_n_contiguous", "plain_sorted", "gated_concat",
                                    "gated_interleaved"])
def test_every_candidate_config_in_bf16_on_gpu(launch, few_sms):
    """Autotuning may pick any candidate (TMA ones included on sm90+), and then its persistent variant: each one
    against float64 in bf16."""
    from moetune.kernels import act_code
    from moetune.kernels.grouped_gemm import candidates_for, tma_candidates

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    E, K, I, T, k = 8, 320, 200, 700, 4  # nothing a multiple of 128; ~350 rows per expert
    gen = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    plan = plan_routing(ids.cuda(), E)
    S = plan.num_rows
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)

    def bf16(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)

    x, w = bf16(T, K), bf16(S)
    interleaved = launch == "gated_interleaved"
    act = GptOssGLU(limit=10.0) if interleaved else SwiGLU()
    tma = tma_candidates("cuda")
    if launch == "plain_sorted":  # the down projection's and the dgrad's A: sorted rows, TMA-readable
        h = bf16(S, K)
        for n in (I, 16):  # and a rank-wide LoRA product
            for b in (bf16(E, n, K).transpose(1, 2), bf16(E, K, n)):  # Qwen3's down weight, gpt-oss's
                ref = reference_rows(plan, h, b)
                for config in with_persistent(candidates_for(0, S, E, n, K, tma, False)):
                    out = fits(config, h, b, **common)
                    if out is not None:
                        close(out, ref, tol=1e-2)
        return
    if launch.startswith("plain"):
        b = bf16(E, I, K).transpose(1, 2) if launch == "plain_k_contiguous" else bf16(E, K, I)
        ref = reference_rows(plan, x, b, plan.token_S)
        for config in with_persistent(candidates_for(0, S, E, I, K, tma)):
            out = fits(config, x, b, a_index=plan.token_S, **common)
            if out is not None:
                close(out, ref, tol=1e-2)
        return
    w1 = bf16(E, K, 2 * I) if interleaved else bf16(E, 2 * I, K).transpose(1, 2)  # gpt-oss's and Qwen3's layouts
    gu_ref = reference_rows(plan, x, w1, plan.token_S)
    for config in with_persistent(candidates_for(1, S, E, I, K, tma)):
        out = fits(config, x, w1, a_index=plan.token_S, epilogue=1, act=act_code(act), interleaved=interleaved,
                   **common)
        if out is None:
            continue
        h, gu = out
        close(gu, gu_ref, tol=1e-2)
        close(h, act.forward(gu.double(), interleaved), tol=1e-2)
    d_out = bf16(T, K)
    w2 = bf16(E, I, K).transpose(1, 2) if interleaved else bf16(E, K, I)
    g = reference_rows(plan, d_out, w2, plan.token_S)
    for config in with_persistent(candidates_for(2, S, E, I, K, tma)):
        out = fits(config, d_out, w2, a_index=plan.token_S, gu=gu, row_scale=w, epilogue=2, act=act_code(act),
                   interleaved=interleaved, **common)
        if out is None:
            continue
        d_gu, dots = out
        close(d_gu, act.backward(gu.double(), g * w.double()[:, None], interleaved), tol=1e-2)
        close(dots, (act.forward(gu.double(), interleaved) * g).sum(-1), tol=1e-2)


def _bad_operand_cases(plan, gen):
    """(what is wrong, grouped_gemm's keyword arguments, the error's start) for operands that used to be read or
    written out of bounds, or silently ignored."""
    S, K, N, E = plan.num_rows, 8, 6, 5
    x, b = rand(gen, plan.num_tokens, K), rand(gen, E, K, N)
    ok = dict(a=x, b=b, offsets_E=plan.offsets_E, counts_E=plan.counts_E, num_rows=S, a_index=plan.token_S)
    strided = torch.stack([plan.perm_S, plan.perm_S], 1)[:, 0]  # every other element of a buffer
    wide = rand(gen, S, 2)
    gu, scale = rand(gen, S, 2 * N), rand(gen, S)
    return [
        ("a narrower than b's K", dict(ok, a=x[:, : K - 2]), "a: expected a 2-D"),
        ("a of another dtype", dict(ok, a=x.double()), "a: expected a 2-D torch.float32"),
        ("b with one expert less", dict(ok, b=b[:-1]), "offsets_E: expected a contiguous 1-D tensor of 4"),
        ("a strided out_index", dict(ok, out_index=strided), "out_index: expected a contiguous 1-D"),
        ("a strided row_scale", dict(ok, row_scale=wide[:, 0]), "row_scale: expected a contiguous 1-D"),
        ("a short row_scale", dict(ok, row_scale=rand(gen, S - 5)), f"row_scale: expected a contiguous 1-D tensor of {S}"),
        ("a strided a_index", dict(ok, a_index=torch.stack([plan.token_S] * 2, 1)[:, 0]), "a_index: expected"),
        ("lora_u without lora_b", dict(ok, lora_u=rand(gen, S, 3)), "lora_u, lora_b: expected both"),
        ("lora_b of another width", dict(ok, lora_u=rand(gen, S, 3), lora_b=rand(gen, E, 3, N + 1)), "lora_b: expected"),
        ("bias of another width", dict(ok, bias=rand(gen, E, N + 2)), "bias: expected"),
        ("epilogue 2 without gu", dict(ok, epilogue=2, row_scale=scale), "gu, row_scale: expected with epilogue 2"),
        ("epilogue 1 given out", dict(ok, b=rand(gen, E, K, 2 * N), epilogue=1, out=rand(gen, S, N)),
         "out: epilogue 1 returns buffers of its own"),
        ("epilogue 1 given gu", dict(ok, b=rand(gen, E, K, 2 * N), epilogue=1, gu=gu), "gu: epilogue 1 returns"),
    ]


def test_bad_operands_get_one_line_errors_naming_them():
    from moetune.kernels import grouped_gemm

    plan, gen = problem()
    for what, kwargs, message in _bad_operand_cases(plan, gen):
        a, b = kwargs.pop("a"), kwargs.pop("b")
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as err:
            grouped_gemm(a, b, **kwargs)
        assert "\n" not in str(err.value), what


def test_wgrad_bad_operands_get_one_line_errors_naming_them():
    from moetune.kernels import grouped_wgrad

    plan, gen = problem()
    S = plan.num_rows
    a, b = rand(gen, S, 4), rand(gen, S, 6)
    ok = dict(num_rows=S, offsets_E=plan.offsets_E)
    cases = [
        (dict(ok, a=a, b=b[:, 0]), r"a, b: expected 2-D row operands"),
        (dict(ok, a=a, b=b, scale=rand(gen, S, 2)[:, 1]), "scale: expected a contiguous 1-D"),
        (dict(ok, a=a, b=b, scale=rand(gen, S - 1)), f"scale: expected a contiguous 1-D tensor of {S}"),
        (dict(ok, a=a[:-3], b=b), f"a: expected a 2-D tensor of at least {S} rows"),
        (dict(ok, a=rand(gen, plan.num_tokens, 4), b=b, a_index=torch.stack([plan.token_S] * 2, 1)[:, 1]),
         "a_index: expected a contiguous 1-D"),
        (dict(ok, offsets_E=torch.stack([plan.offsets_E] * 2, 1)[:, 0], a=a, b=b), "offsets_E: expected"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match="^" + message):
            grouped_wgrad(kwargs.pop("a"), kwargs.pop("b"), **kwargs)
    # b in another dtype is taken: the kernel casts its tiles to a's.
    ref = grouped_wgrad(a, b, **ok)
    close(grouped_wgrad(a, b.half().float().half(), **ok), ref.double(), tol=1e-3)


def test_tile_schedules_follow_counts_written_in_place():
    """A caller that reuses its counts buffer for the next routing gets that routing's tile schedule."""
    gg = importlib.import_module("moetune.kernels.grouped_gemm")
    counts = torch.tensor([5, 0, 17, 3], device=DEVICE)
    first = gg.tile_schedule(counts, 16)
    assert gg.tile_schedule(counts, 16) is first  # memoised
    counts.copy_(torch.tensor([40, 1, 0, 2], device=DEVICE))
    assert gg.tile_schedule(counts, 16).tolist() == [3, 4, 4, 5]
