"""moetune/models/packed_attention.py: packed rows through varlen attention against transformers' block-diagonal mask.

torch's varlen kernel runs on CUDA only, so the CPU tests put a stand-in for it (causal sdpa over each segment) and
check everything around it: the boundaries reaching every layer's attention through transformers' keyword
arguments, the layouts, grouped key/value heads, latent attention's narrower values, no mask built. The GPU test
runs the real kernel against transformers' masked path.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import transformers

from moetune.models import SUPPORTED_MODEL_TYPES, packed_attention

from .helpers import lora_model, relative_error, save_checkpoint, stand_in_varlen, token_batch

# gpt-oss keeps flex attention under --packing: its sinks are not in flash attention (usable() says no)
ARCHS = [m for m in SUPPORTED_MODEL_TYPES if m != "gpt_oss"]
LENGTHS = [[3, 5, 4], [7, 5]]  # two packed rows of 12 tokens: examples, the second row's last one its padding
ROW = 12


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(packed_attention, "kernel", stand_in_varlen)
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, packed_attention.NAME,
                        packed_attention.packed_attention_forward)


def positions(lengths):
    return torch.tensor([[p for n in row for p in range(n)] for row in lengths])


def loss_and_grads(model, ids, **kwargs):
    """(loss, LoRA gradients); the loss, not the logits: in training moetune's fused loss returns placeholder logits."""
    out = model(input_ids=ids, labels=ids, use_cache=False, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, params)


@pytest.mark.parametrize("model_type", ARCHS)
def test_packed_rows_match_the_block_diagonal_mask(model_type, registered, tmp_path):
    model = lora_model(save_checkpoint(model_type, str(tmp_path))).train()  # checkpointed layers recompute
    base = model.get_base_model()
    assert base.config._attn_implementation == "sdpa"
    ids, pos = token_batch(2, ROW), positions(LENGTHS)
    want_loss, want_grads = loss_and_grads(model, ids, position_ids=pos)  # transformers' [B, 1, T, T] mask

    base.set_attn_implementation(packed_attention.NAME)
    built = []
    from transformers import masking_utils

    real = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda p: built.append(p) or real(p)
    try:
        loss, grads = loss_and_grads(model, ids, position_ids=pos, **packed_attention.boundaries(LENGTHS, ROW))
    finally:
        masking_utils.find_packed_sequence_indices = real
    assert not built  # no mask, and no look at the positions on the device
    assert relative_error(loss, want_loss) < 1e-5
    for got, want in zip(grads, want_grads, strict=True):
        assert relative_error(got, want) < 1e-5


# Qwen3-MoE passes its window to the attention function; Qwen2-MoE sets it on its sliding layers' modules only
WINDOWED = {"qwen3_moe": dict(use_sliding_window=True, sliding_window=3),
            "qwen2_moe": dict(use_sliding_window=True, sliding_window=3,
                              layer_types=["sliding_attention", "full_attention"])}


@pytest.mark.parametrize("model_type", sorted(WINDOWED))
def test_a_sliding_window_is_the_masks(model_type, registered, tmp_path):
    model = lora_model(save_checkpoint(model_type, str(tmp_path), **WINDOWED[model_type])).train()
    base = model.get_base_model()
    ids, pos = token_batch(2, ROW), positions(LENGTHS)
    want_loss, want_grads = loss_and_grads(model, ids, position_ids=pos)
    base.set_attn_implementation(packed_attention.NAME)
    loss, grads = loss_and_grads(model, ids, position_ids=pos, **packed_attention.boundaries(LENGTHS, ROW))
    assert relative_error(loss, want_loss) < 1e-5
    for got, want in zip(grads, want_grads, strict=True):
        assert relative_error(got, want) < 1e-5
    plain = lora_model(save_checkpoint(model_type, str(tmp_path / "plain"))).train()  # the same weights, no window
    unwindowed, plain_grads = loss_and_grads(plain, ids, position_ids=pos)
    assert max(relative_error(a, b) for a, b in zip(plain_grads, want_grads)) > 1e-3  # the window cut some context


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU kernels for the op; the GPU test runs torch's own")
@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_torchs_own_varlen_attn_takes_what_moetune_passes(model_type, varlen_op_on_cpu, tmp_path, monkeypatch):
    """This torch's varlen_attn, its op and autograd (CPU kernels from the tests): the keyword arguments moetune
    chooses for its signature (window_size, scale, enable_gqa for Qwen3's fewer key/value heads; DeepSeek-V3's
    narrower values padded) give the mask's loss and gradients, through checkpointed layers."""
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, packed_attention.NAME,
                        packed_attention.packed_attention_forward)
    runs, real = [], packed_attention._varlen()

    @functools.wraps(real)  # (its signature: what moetune reads to choose the keywords)
    def recording(*args, **kwargs):
        runs.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(packed_attention, "_varlen", lambda: recording)
    model = lora_model(save_checkpoint(model_type, str(tmp_path))).train()
    ids, pos = token_batch(2, ROW), positions(LENGTHS)
    want_loss, want_grads = loss_and_grads(model, ids, position_ids=pos)
    model.get_base_model().set_attn_implementation(packed_attention.NAME)
    loss, grads = loss_and_grads(model, ids, position_ids=pos, **packed_attention.boundaries(LENGTHS, ROW))
    assert len(runs) == 4 and runs[0]["window_size"] == (-1, 0)  # forward and recompute of both layers
    assert runs[0].get("enable_gqa", False) is (model_type == "qwen3_moe") and runs[0]["scale"] > 0
    assert relative_error(loss, want_loss) < 1e-5
    for got, want in zip(grads, want_grads, strict=True):
        assert relative_error(got, want) < 1e-5


def test_without_boundaries_the_segments_come_from_the_positions(registered, tmp_path):
    """A caller that passes only position_ids (TRL's padding-free batches) gets the segments transformers would
    find in them."""
    model = lora_model(save_checkpoint("qwen3_moe", str(tmp_path))).train()
    ids, pos = token_batch(2, ROW), positions(LENGTHS)
    want_loss, want_grads = loss_and_grads(model, ids, position_ids=pos)
    model.get_base_model().set_attn_implementation(packed_attention.NAME)
    loss, grads = loss_and_grads(model, ids, position_ids=pos)
    assert relative_error(loss, want_loss) < 1e-5
    for got, want in zip(grads, want_grads, strict=True):
        assert relative_error(got, want) < 1e-5
    offsets, longest = packed_attention._segments(pos, 2, ROW, "cpu")
    assert offsets.tolist() == packed_attention.boundaries(LENGTHS, ROW)["cu_seq_lens_q"].tolist() and longest == 7


def test_without_boundaries_each_row_is_one_causal_sequence(registered, tmp_path):
    model = lora_model(save_checkpoint("qwen3_moe", str(tmp_path)))
    ids = token_batch(2, ROW)
    want, _ = loss_and_grads(model, ids)
    model.get_base_model().set_attn_implementation(packed_attention.NAME)
    got, _ = loss_and_grads(model, ids)
    assert relative_error(got, want) < 1e-5


def test_refuses_what_it_does_not_compute(registered):
    q = torch.randn(1, 4, 6, 8)
    kv = torch.randn(1, 2, 6, 8)
    forward = packed_attention.packed_attention_forward
    with pytest.raises(ValueError, match="as many keys as queries"):
        forward(None, q, torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8), None)
    with pytest.raises(ValueError, match="dropout is not supported"):
        forward(None, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match="not an attention mask"):
        forward(None, q, kv, kv, torch.ones(1, 1, 6, 6, dtype=torch.bool))


def test_boundaries_are_offsets_of_the_rows_laid_end_to_end():
    got = packed_attention.boundaries(LENGTHS, ROW)
    assert got["cu_seq_lens_q"].tolist() == [0, 3, 8, 12, 19, 24] and got["cu_seq_lens_q"].dtype == torch.int32
    assert got["cu_seq_lens_k"] is got["cu_seq_lens_q"]
    assert got["max_length_q"] == got["max_length_k"] == 7
    with pytest.raises(ValueError, match="lengths: expected positive segment lengths summing to 12"):
        packed_attention.boundaries([[3, 5]], ROW)
    with pytest.raises(ValueError, match="lengths"):
        packed_attention.boundaries([[12, 0]], ROW)


def _fake_varlen(signature: str, calls: list):
    """A varlen_attn of one of torch's signatures, recording its keywords and key heads."""
    def first(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        calls.append(dict(is_causal=is_causal, key_heads=key.shape[1], query=query))
        return query

    def later(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False):
        calls.append(dict(scale=scale, window_size=window_size, enable_gqa=enable_gqa, key_heads=key.shape[1],
                          query=query))
        return query

    return {"first": first, "later": later}[signature]


@pytest.mark.parametrize("signature", ["first", "later"])
def test_kernel_speaks_each_torch_signature(signature, monkeypatch):
    calls = []
    monkeypatch.setattr(packed_attention, "_varlen", lambda: _fake_varlen(signature, calls))
    q, kv = torch.randn(6, 4, 16), torch.randn(6, 2, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    packed_attention.kernel(q, kv, kv, cu, 6, 0.5, None)
    if signature == "first":  # no scale, no window, no enable_gqa: scale folded into q, the heads repeated
        with pytest.raises(ValueError, match="no window_size for a sliding window of 4"):
            packed_attention.kernel(q, kv, kv, cu, 6, 0.5, 4)
        assert calls[0]["is_causal"] is True and calls[0]["key_heads"] == 4
        torch.testing.assert_close(calls[0]["query"], q * (0.5 * 16**0.5))
    else:
        packed_attention.kernel(q, kv, kv, cu, 6, 0.5, 4)
        assert calls[0]["window_size"] == (-1, 0) and calls[1]["window_size"] == (3, 0)
        assert calls[0]["scale"] == 0.5 and calls[0]["enable_gqa"] is True and calls[0]["key_heads"] == 2
        assert calls[0]["query"] is q


def test_usable_only_where_the_kernel_runs_and_the_model_fits_it(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    later = inspect.signature(_fake_varlen("later", [])).parameters
    monkeypatch.setattr(packed_attention, "_parameters", lambda: frozenset(later))
    monkeypatch.setattr(packed_attention, "_varlen", lambda: object())
    qwen3 = transformers.Qwen3MoeConfig(head_dim=128)
    usable = packed_attention.usable
    assert usable(qwen3, cuda, torch.bfloat16, "sdpa")
    assert not usable(qwen3, torch.device("cpu"), torch.bfloat16, "sdpa")
    assert not usable(qwen3, cuda, torch.float32, "sdpa")  # flash attention: 16-bit only
    assert not usable(qwen3, cuda, torch.bfloat16, "flex_attention")  # gpt-oss's sinks
    assert not usable(transformers.Qwen3MoeConfig(head_dim=512), cuda, torch.bfloat16, "sdpa")
    assert not usable(transformers.Qwen3MoeConfig(attention_dropout=0.1), cuda, torch.bfloat16, "sdpa")
    assert usable(transformers.DeepseekV3Config(), cuda, torch.bfloat16, "sdpa")  # q/k 192 wide, values 128
    sliding = transformers.Qwen3MoeConfig(use_sliding_window=True, sliding_window=64)
    assert usable(sliding, cuda, torch.bfloat16, "sdpa")
    monkeypatch.setattr(packed_attention, "_parameters", lambda: frozenset({"is_causal"}))
    assert not usable(sliding, cuda, torch.bfloat16, "sdpa")  # the first varlen_attn had no window
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not usable(qwen3, cuda, torch.bfloat16, "sdpa")  # flash attention needs sm80


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_the_real_kernel_matches_the_block_diagonal_mask_on_cuda(model_type, tmp_path):
    from moetune import FastMoEModel

    # (save_checkpoint updates attributes: DeepSeek-V3's derived qk_head_dim and head_dim given too)
    head = {"qwen3_moe": dict(head_dim=64), "deepseek_v3": dict(qk_nope_head_dim=64, qk_rope_head_dim=32,
                                                                 v_head_dim=64, qk_head_dim=96, head_dim=32)}[model_type]
    directory = save_checkpoint(model_type, str(tmp_path), **head)
    model, _ = FastMoEModel.from_pretrained(directory, dtype=torch.bfloat16, device_map="cuda")
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0).train()
    assert packed_attention.usable(model.config, torch.device("cuda"), torch.bfloat16, "sdpa")
    ids, pos = token_batch(2, ROW).cuda(), positions(LENGTHS).cuda()
    want_loss, want_grads = loss_and_grads(model, ids, position_ids=pos)
    assert packed_attention.use_for(model.get_base_model(), torch.device("cuda"), torch.bfloat16)
    bounds = {k: v.cuda() if isinstance(v, torch.Tensor) else v
              for k, v in packed_attention.boundaries(LENGTHS, ROW).items()}
    loss, grads = loss_and_grads(model, ids, position_ids=pos, **bounds)
    assert relative_error(loss.float(), want_loss.float()) < 2e-2
    for got, want in zip(grads, want_grads, strict=True):
        assert relative_error(got.float(), want.float()) < 5e-2


def test_a_non_causal_call_is_sdpas(registered):
    """Qwen3-VL's vision blocks call the text model's attention implementation with is_causal=False."""
    q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    got, _ = packed_attention.packed_attention_forward(None, q, kv, kv, None, is_causal=False)
    want = torch.nn.functional.scaled_dot_product_attention(q, kv, kv).transpose(1, 2)
    assert relative_error(got, want) < 1e-6
