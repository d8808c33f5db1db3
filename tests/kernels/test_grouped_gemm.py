"""The Triton kernels one by one against plain torch (Triton's interpreter on CPU, the GPU when there is one).

Each epilogue of the row-grouped GEMM and each mode of the K-grouped one is checked directly,
so a kernel bug shows up here with its name rather than as a wrong gradient in tests/experts.
"""

from __future__ import annotations

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


@pytest.mark.parametrize("mode", ["plain", "gather_a_scale", "gather_b", "act_b"])
def test_wgrad_modes_and_empty_experts(mode):
    from moetune.kernels import act_code, grouped_wgrad

    plan, gen = problem(seed=2)
    S, M, N = plan.num_rows, 17, 12
    kwargs = dict(num_rows=S, offsets_E=plan.offsets_E)
    act = SwiGLU()
    if mode == "plain":
        a, b = rand(gen, S, M), rand(gen, S, N)
        a_rows, b_rows = a, b
        out = grouped_wgrad(a, b, alpha=2.0, **kwargs)
        a_rows = 2.0 * a_rows
    elif mode == "gather_a_scale":
        a, b, scale = rand(gen, plan.num_tokens, M), rand(gen, S, N), rand(gen, S)
        out = grouped_wgrad(a, b, a_index=plan.token_S, scale=scale, **kwargs)
        a_rows, b_rows = a[plan.token_S], b * scale[:, None]
    elif mode == "gather_b":
        a, b = rand(gen, S, M), rand(gen, plan.num_tokens, N)
        out = grouped_wgrad(a, b, b_index=plan.token_S, **kwargs)
        a_rows, b_rows = a, b[plan.token_S]
    else:
        a, gu = rand(gen, S, M), rand(gen, S, 2 * N)
        out = grouped_wgrad(a, gu, b_act=act_code(act), **kwargs)
        a_rows, b_rows = a, act.forward(gu.double())
    ref = torch.zeros(5, M, N, dtype=torch.float64, device=DEVICE)
    ref.index_add_(0, plan.expert_S, torch.einsum("sm,sn->smn", a_rows.double(), b_rows.double()))
    close(out, ref)
    assert out[3].abs().sum() == 0  # the empty expert


def test_split_config_is_refused_outside_the_activation_gradient_epilogue():
    from moetune.kernels import grouped_gemm

    plan, gen = problem()
    x, b = rand(gen, plan.num_tokens, 8), rand(gen, 5, 8, 8)
    config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "SPLIT": True}
    with pytest.raises(ValueError, match="config: SPLIT applies to the activation-gradient epilogue"):
        grouped_gemm(x, b, plan.offsets_E, plan.counts_E, num_rows=plan.num_rows, a_index=plan.token_S, config=config)


@pytest.mark.parametrize("layout", ["k_contiguous", "n_contiguous"])
def test_weight_through_tma_descriptors(layout):
    """The experimental TMA path for the weight (MOETUNE_TRITON_TMA=1 adds it to tuning): both weight layouts,
    tails in K and N (boxes past an expert's rows read the next expert's, which the masks must neutralise)."""
    from moetune.kernels import grouped_gemm
    from moetune.kernels.grouped_gemm import TensorDescriptor, weight_descriptor

    if TensorDescriptor is None:
        pytest.skip("this Triton has no host TMA descriptors")
    plan, gen = problem(seed=3)
    S, K, N, R = plan.num_rows, 40, 24, 3  # tails for 16-wide tiles; rows 16-byte aligned in fp32
    x = rand(gen, plan.num_tokens, K)
    if layout == "k_contiguous":  # a transposed view of an [E, N, K] weight (gate_up and down forward)
        b = rand(gen, 5, N, K).transpose(1, 2)
    else:  # a contiguous [E, K, N] weight (the backward's dgrad)
        b = rand(gen, 5, K, N)
    mode, _ = weight_descriptor(b, 16, 16)
    assert mode == (1 if layout == "k_contiguous" else 2)
    u, lb, bias, scale = rand(gen, S, R), rand(gen, 5, R, N), rand(gen, 5, N), rand(gen, S)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2, "TMA_B": True}
    out = grouped_gemm(x, b, a_index=plan.token_S, lora_u=u, lora_b=lb, bias=bias, alpha=0.5,
                       row_scale=scale, out_index=plan.perm_S, config=config, **common)
    ref = reference_rows(plan, x, b, plan.token_S) + torch.einsum("sr,srn->sn", u.double(), lb.double()[plan.expert_S])
    ref = (0.5 * ref + bias.double()[plan.expert_S]) * scale.double()[:, None]
    scattered = torch.empty_like(ref)
    scattered[plan.perm_S] = ref
    close(out, scattered)
    # An unaligned view falls back to pointer loads.
    assert weight_descriptor(rand(gen, 5, 7, 5).transpose(1, 2), 16, 16) == (0, None)


def test_tma_split_activation_gradient_and_refusals():
    from moetune.kernels import act_code, grouped_gemm
    from moetune.kernels.grouped_gemm import TensorDescriptor, candidates_for

    if TensorDescriptor is None:
        pytest.skip("this Triton has no host TMA descriptors")
    plan, gen = problem(seed=4)
    S, K, I = plan.num_rows, 32, 20
    act = SwiGLU()
    gu, d_out, w2, w = rand(gen, S, 2 * I), rand(gen, plan.num_tokens, K), rand(gen, 5, K, I), rand(gen, S)
    common = dict(num_rows=S, offsets_E=plan.offsets_E, counts_E=plan.counts_E)
    split = next(c for c in candidates_for(2, S, 5, I, K) if c.get("SPLIT"))
    d_gu, dots = grouped_gemm(d_out, w2, a_index=plan.token_S, gu=gu, row_scale=w, epilogue=2, act=act_code(act),
                              config=dict(split, TMA_B=True), **common)
    g = reference_rows(plan, d_out, w2, plan.token_S)
    close(d_gu, act.backward(gu.double(), g * w.double()[:, None]))
    close(dots, (act.forward(gu.double()) * g).sum(-1))
    with pytest.raises(ValueError, match="config: TMA_B applies to the plain GEMM"):
        grouped_gemm(d_out, w2, a_index=plan.token_S, gu=gu, row_scale=w, epilogue=2, act=act_code(act),
                     config={"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2,
                             "TMA_B": True}, **common)


def test_tma_candidates_only_when_asked(monkeypatch):
    from moetune.kernels.grouped_gemm import TensorDescriptor, candidates_for

    monkeypatch.delenv("MOETUNE_TRITON_TMA", raising=False)
    assert not any(c.get("TMA_B") for c in candidates_for(0, 65536, 128, 2048, 768))
    monkeypatch.setenv("MOETUNE_TRITON_TMA", "1")
    with_tma = candidates_for(0, 65536, 128, 2048, 768)
    assert any(c.get("TMA_B") for c in with_tma) == (TensorDescriptor is not None)
    assert not any(c.get("TMA_B") for c in candidates_for(0, 65536, 128, 16, 2048))  # rank-wide LoRA products
    assert not any(c.get("TMA_B") for c in candidates_for(1, 65536, 128, 768, 2048))  # the gated epilogue
