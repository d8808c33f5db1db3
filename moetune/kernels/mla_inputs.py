"""The query, key and value of multi-head latent attention (MLA: deepseek_v3, glm4_moe_lite) in one pass each way.

transformers builds them from three projections' outputs:

    query = cat(q_pass, rope(q_rot))                 q_states [B, T, Hh, NOPE + ROPE] split per head
    key   = cat(k_nope, rope(k_rot) for every head)  kv [B, T, Hh, NOPE + V] split per head; k_rot [B, T, ROPE], one head
    value = the V part of kv

as a dozen launches forward (the rotary's slices, products and cat, the query's cat, the key's two copies) and
as many backward (the cats' and splits' gradients, the head transposes, the sum over heads of the shared
rotary key), most of them transposing copies of [B, Hh, T, 256]-sized tensors: at 8K tokens about 2 ms of a
GLM-4.7-Flash layer's 19 ms, with the forward run twice under checkpointing. Here one launch reads the three
inputs once and writes the three outputs in [B, T, Hh, D] layout (attention takes their transposed views), and
one launch writes the three gradients.

Shape legend: B batch, T tokens, Hh heads, NOPE / ROPE / V the per-head widths (ROPE even, HALF = ROPE // 2).

    q      [B, T, Hh, NOPE + ROPE]  any strides with the last dim contiguous
    kv     [B, T, Hh, NOPE + V]     likewise
    k_rot  [B, T, ROPE]             likewise (a slice of kv_a_proj_with_mqa's output)
    cos    [Bc, T, ROPE]            Bc = B or 1, any strides, the inputs' dtype; sin likewise
    query, key [B, T, Hh, NOPE + ROPE] and value [B, T, Hh, V]: new, contiguous

The rotary, per head, on the pairs (x1[j], x2[j]), j < HALF:
    interleaved (rope_interleave=True):  x1 = x[0::2], x2 = x[1::2], c1 = c2 = cos[:HALF], s1 = s2 = sin[:HALF]
    halves (rotate_half):                x1 = x[:HALF], x2 = x[HALF:], c1, c2 = cos's halves, s1, s2 = sin's
    forward  y[:HALF] = x1 * c1 - x2 * s1,  y[HALF:] = x2 * c2 + x1 * s2     (both forms write y in halves)
    backward dx1 = g1 * c1 + g2 * s2,       dx2 = g2 * c2 - g1 * s1
Rounding: as in kernels/rotary.py, each product and sum is rounded to the dtype where torch rounds it, so the
outputs are bitwise transformers'. The key's rotary gradient is summed over heads in fp32 and rounded once
(torch's sum of the expanded key's gradient), then rotated back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .. import saved_tensors
from .launch import launch as launch_kernel
from .rotary import rotate_pair, table_strides
from .sizes import next_power_of_2

__all__ = ["MLAInputsFunction", "check_inputs", "mla_inputs", "mla_inputs_backward", "mla_inputs_forward"]

# Elements of one head-block of a program's widest tile [BLOCK_H, BLOCK_V]
TILE_ELEMENTS = 4096


@triton.jit
def _pair_offsets(j, INTERLEAVE: tl.constexpr, HALF):
    """Offsets of the pair (x1[j], x2[j]) inside the rotary part of a head."""
    if INTERLEAVE:
        return 2 * j, 2 * j + 1
    return j, j + HALF


@triton.jit
def _tables(cos_ptr, sin_ptr, offset, sc_d, C2, j, j_mask):
    """One token's (c1, c2, s1, s2) in fp32: the table entries of pair j (C2: where the second half's start)."""
    c1 = tl.load(cos_ptr + offset + j * sc_d, mask=j_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + offset + (j + C2) * sc_d, mask=j_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + offset + j * sc_d, mask=j_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + offset + (j + C2) * sc_d, mask=j_mask, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _head_block(h0, Hh, NOPE, n, j_mask, BLOCK_H: tl.constexpr):
    """Heads h0 .. h0 + BLOCK_H (int64: h * stride passes 2**31 in a [B, H, T, D] layout), their row mask, and
    the masks of the non-rotary and rotary columns."""
    h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    h_mask = (h < Hh)[:, None]
    return h, h_mask, h_mask & (n < NOPE)[None, :], h_mask & j_mask[None, :]


@triton.jit
def mla_inputs_forward_kernel(
    q_ptr, sq_b, sq_t, sq_h,
    kv_ptr, skv_b, skv_t, skv_h,
    kr_ptr, skr_b, skr_t,
    cos_ptr, sin_ptr, sc_b, sc_t, sc_d, C2,
    query_ptr, key_ptr, value_ptr,
    T, Hh, NOPE, HALF, V,
    INTERLEAVE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One token (b, t), every head: q, kv, k_rot -> query, key, value."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    dtype = q_ptr.dtype.element_ty
    DQK = NOPE + 2 * HALF

    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    i1, i2 = _pair_offsets(j, INTERLEAVE, HALF)
    c1, c2, s1, s2 = _tables(cos_ptr, sin_ptr, b * sc_b + t * sc_t, sc_d, C2, j, j_mask)

    # The shared rotary key: one head, broadcast to every head below.
    kr_row = kr_ptr + b * skr_b + t * skr_t
    k1 = tl.load(kr_row + i1, mask=j_mask, other=0.0).to(tl.float32)
    k2 = tl.load(kr_row + i2, mask=j_mask, other=0.0).to(tl.float32)
    ky1, ky2 = rotate_pair(k1, k2, c1, c2, s1, s2, dtype, False)
    ky1, ky2 = ky1.to(dtype), ky2.to(dtype)

    n = tl.arange(0, BLOCK_NOPE)
    v = tl.arange(0, BLOCK_V)
    for h0 in range(0, Hh, BLOCK_H):
        h, h_mask, nope_mask, rot_mask = _head_block(h0, Hh, NOPE, n, j_mask, BLOCK_H)
        q_head = q_ptr + b * sq_b + t * sq_t + h[:, None] * sq_h
        kv_head = kv_ptr + b * skv_b + t * skv_t + h[:, None] * skv_h
        out_head = (row * Hh + h[:, None]) * DQK  # query and key: contiguous [B, T, Hh, DQK]

        q_pass = tl.load(q_head + n[None, :], mask=nope_mask, other=0.0)
        tl.store(query_ptr + out_head + n[None, :], q_pass, mask=nope_mask)
        x1 = tl.load(q_head + NOPE + i1[None, :], mask=rot_mask, other=0.0).to(tl.float32)
        x2 = tl.load(q_head + NOPE + i2[None, :], mask=rot_mask, other=0.0).to(tl.float32)
        y1, y2 = rotate_pair(x1, x2, c1[None, :], c2[None, :], s1[None, :], s2[None, :], dtype, False)
        tl.store(query_ptr + out_head + NOPE + j[None, :], y1.to(dtype), mask=rot_mask)
        tl.store(query_ptr + out_head + NOPE + HALF + j[None, :], y2.to(dtype), mask=rot_mask)

        k_nope = tl.load(kv_head + n[None, :], mask=nope_mask, other=0.0)
        tl.store(key_ptr + out_head + n[None, :], k_nope, mask=nope_mask)
        tl.store(key_ptr + out_head + NOPE + j[None, :], tl.broadcast_to(ky1[None, :], (BLOCK_H, BLOCK_HALF)), mask=rot_mask)
        tl.store(
            key_ptr + out_head + NOPE + HALF + j[None, :], tl.broadcast_to(ky2[None, :], (BLOCK_H, BLOCK_HALF)),
            mask=rot_mask,
        )

        v_mask = h_mask & (v < V)[None, :]
        value = tl.load(kv_head + NOPE + v[None, :], mask=v_mask, other=0.0)
        tl.store(value_ptr + (row * Hh + h[:, None]) * V + v[None, :], value, mask=v_mask)


@triton.jit
def mla_inputs_backward_kernel(
    dq_ptr, sdq_b, sdq_t, sdq_h,
    dk_ptr, sdk_b, sdk_t, sdk_h,
    dv_ptr, sdv_b, sdv_t, sdv_h,
    cos_ptr, sin_ptr, sc_b, sc_t, sc_d, C2,
    gq_ptr, gkv_ptr, gkr_ptr,
    T, Hh, NOPE, HALF, V,
    INTERLEAVE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One token (b, t), every head: the outputs' gradients -> those of q, kv and k_rot (all contiguous)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    dtype = gq_ptr.dtype.element_ty
    DQK = NOPE + 2 * HALF
    DKV = NOPE + V

    j = tl.arange(0, BLOCK_HALF)
    j_mask = j < HALF
    i1, i2 = _pair_offsets(j, INTERLEAVE, HALF)
    c1, c2, s1, s2 = _tables(cos_ptr, sin_ptr, b * sc_b + t * sc_t, sc_d, C2, j, j_mask)

    n = tl.arange(0, BLOCK_NOPE)
    v = tl.arange(0, BLOCK_V)
    key_sum1 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    key_sum2 = tl.zeros([BLOCK_HALF], dtype=tl.float32)
    for h0 in range(0, Hh, BLOCK_H):
        h, h_mask, nope_mask, rot_mask = _head_block(h0, Hh, NOPE, n, j_mask, BLOCK_H)
        dq_head = dq_ptr + b * sdq_b + t * sdq_t + h[:, None] * sdq_h
        dk_head = dk_ptr + b * sdk_b + t * sdk_t + h[:, None] * sdk_h
        gq_head = gq_ptr + (row * Hh + h[:, None]) * DQK
        gkv_head = gkv_ptr + (row * Hh + h[:, None]) * DKV

        tl.store(gq_head + n[None, :], tl.load(dq_head + n[None, :], mask=nope_mask, other=0.0), mask=nope_mask)
        g1 = tl.load(dq_head + NOPE + j[None, :], mask=rot_mask, other=0.0).to(tl.float32)
        g2 = tl.load(dq_head + NOPE + HALF + j[None, :], mask=rot_mask, other=0.0).to(tl.float32)
        dx1, dx2 = rotate_pair(g1, g2, c1[None, :], c2[None, :], s1[None, :], s2[None, :], dtype, True)
        tl.store(gq_head + NOPE + i1[None, :], dx1.to(dtype), mask=rot_mask)
        tl.store(gq_head + NOPE + i2[None, :], dx2.to(dtype), mask=rot_mask)

        tl.store(gkv_head + n[None, :], tl.load(dk_head + n[None, :], mask=nope_mask, other=0.0), mask=nope_mask)
        key_sum1 += tl.sum(tl.load(dk_head + NOPE + j[None, :], mask=rot_mask, other=0.0).to(tl.float32), axis=0)
        key_sum2 += tl.sum(
            tl.load(dk_head + NOPE + HALF + j[None, :], mask=rot_mask, other=0.0).to(tl.float32), axis=0
        )

        v_mask = h_mask & (v < V)[None, :]
        dv_head = dv_ptr + b * sdv_b + t * sdv_t + h[:, None] * sdv_h
        tl.store(gkv_head + NOPE + v[None, :], tl.load(dv_head + v[None, :], mask=v_mask, other=0.0), mask=v_mask)

    # rounded once, as torch's sum of the expanded key's gradient is
    gk1 = key_sum1.to(dtype).to(tl.float32)
    gk2 = key_sum2.to(dtype).to(tl.float32)
    dk1, dk2 = rotate_pair(gk1, gk2, c1, c2, s1, s2, dtype, True)
    gkr_row = gkr_ptr + row * 2 * HALF
    tl.store(gkr_row + i1, dk1.to(dtype), mask=j_mask)
    tl.store(gkr_row + i2, dk2.to(dtype), mask=j_mask)


def check_inputs(q, kv, k_rot, cos, sin, nope: int) -> str | None:
    """Why the kernels cannot take these tensors (None when they can)."""
    if q.dim() != 4 or kv.dim() != 4 or k_rot.dim() != 3 or cos.dim() != 3 or sin.shape != cos.shape:
        return "expects q, kv [B, T, heads, D], k_rot [B, T, ROPE] and cos, sin [B or 1, T, ROPE]"
    B, T, Hh, DQK = q.shape
    rope = k_rot.shape[-1]
    if (
        kv.shape[:3] != (B, T, Hh) or k_rot.shape[:2] != (B, T) or rope % 2 or not 0 < nope < DQK
        or DQK != nope + rope or kv.shape[-1] <= nope or tuple(cos.shape[1:]) != (T, rope) or cos.shape[0] not in (1, B)
    ):
        return (
            f"shapes q {tuple(q.shape)}, kv {tuple(kv.shape)}, k_rot {tuple(k_rot.shape)}, cos {tuple(cos.shape)} "
            f"with {nope} non-rotary dims per head do not match"
        )
    tensors = (q, kv, k_rot, cos, sin)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or any(x.dtype != q.dtype for x in tensors):
        return f"dtypes {[x.dtype for x in tensors]}: expected one of fp32/fp16/bf16 for all five"
    if any(x.stride(-1) != 1 for x in (q, kv, k_rot)) or sin.stride() != cos.stride():
        return "the last dim of q, kv and k_rot must be contiguous and cos, sin laid out alike"
    if any(x.device != q.device for x in tensors):
        return "q, kv, k_rot, cos and sin must be on one device"
    return None


def _blocks(Hh: int, nope: int, half: int, v: int) -> dict:
    widest = next_power_of_2(max(nope, v))
    return dict(
        BLOCK_H=max(1, min(next_power_of_2(Hh), TILE_ELEMENTS // widest)),
        BLOCK_NOPE=next_power_of_2(nope), BLOCK_HALF=next_power_of_2(half), BLOCK_V=next_power_of_2(v),
    )


def mla_inputs_forward(q, kv, k_rot, cos, sin, nope: int, interleave: bool):
    """(query, key, value), each new and contiguous [B, T, heads, D]; no autograd. See the module docstring."""
    B, T, Hh, DQK = q.shape
    half, v = (DQK - nope) // 2, kv.shape[-1] - nope
    query = torch.empty(B, T, Hh, DQK, dtype=q.dtype, device=q.device)
    key = torch.empty_like(query)
    value = torch.empty(B, T, Hh, v, dtype=q.dtype, device=q.device)
    if B * T * Hh:
        launch_kernel(
            mla_inputs_forward_kernel, (B * T,),
            q, q.stride(0), q.stride(1), q.stride(2),
            kv, kv.stride(0), kv.stride(1), kv.stride(2),
            k_rot, k_rot.stride(0), k_rot.stride(1),
            cos, sin, *table_strides(cos), 0 if interleave else half,
            query, key, value,
            T, Hh, nope, half, v,
            INTERLEAVE=interleave, **_blocks(Hh, nope, half, v), enable_fp_fusion=False,
        )
    return query, key, value


def mla_inputs_backward(d_query, d_key, d_value, cos, sin, nope: int, interleave: bool):
    """The gradients of q, kv and k_rot (new, contiguous) from those of query, key and value (any strides)."""
    d_query, d_key, d_value = (g if g.stride(-1) == 1 else g.contiguous() for g in (d_query, d_key, d_value))
    B, T, Hh, DQK = d_query.shape
    half, v = (DQK - nope) // 2, d_value.shape[-1]
    d_q = torch.empty(B, T, Hh, DQK, dtype=d_query.dtype, device=d_query.device)
    d_kv = torch.empty(B, T, Hh, nope + v, dtype=d_query.dtype, device=d_query.device)
    d_k_rot = torch.empty(B, T, 2 * half, dtype=d_query.dtype, device=d_query.device)
    if B * T * Hh:
        launch_kernel(
            mla_inputs_backward_kernel, (B * T,),
            d_query, d_query.stride(0), d_query.stride(1), d_query.stride(2),
            d_key, d_key.stride(0), d_key.stride(1), d_key.stride(2),
            d_value, d_value.stride(0), d_value.stride(1), d_value.stride(2),
            cos, sin, *table_strides(cos), 0 if interleave else half,
            d_q, d_kv, d_k_rot,
            T, Hh, nope, half, v,
            INTERLEAVE=interleave, **_blocks(Hh, nope, half, v), enable_fp_fusion=False,
        )
    elif B * T:
        d_k_rot.zero_()
    return d_q, d_kv, d_k_rot


class MLAInputsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, k_rot, cos, sin, nope, interleave):
        saved_tensors.save(ctx, cos, sin, hold=(cos, sin))  # the layers' shared tables, as rotary.py holds them
        ctx.nope, ctx.interleave = nope, interleave
        return mla_inputs_forward(q, kv, k_rot, cos, sin, nope, interleave)

    @staticmethod
    @once_differentiable  # a double backward (create_graph=True) raises instead of silently losing its graph
    def backward(ctx, d_query, d_key, d_value):
        cos, sin = saved_tensors.load(ctx)
        d_q, d_kv, d_k_rot = mla_inputs_backward(d_query, d_key, d_value, cos, sin, ctx.nope, ctx.interleave)
        return d_q, d_kv, d_k_rot, None, None, None, None


def mla_inputs(q, kv, k_rot, cos, sin, nope: int, interleave: bool):
    """MLA's (query, key, value), each [B, T, heads, D] (differentiable in q, kv and k_rot). See the module
    docstring; cos and sin get no gradient."""
    problem = check_inputs(q, kv, k_rot, cos, sin, nope)
    if problem is not None:
        raise ValueError(f"mla_inputs: {problem}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("mla_inputs: cos and sin must not require grad (the kernel gives them no gradient)")
    return MLAInputsFunction.apply(q, kv, k_rot, cos, sin, nope, bool(interleave))
