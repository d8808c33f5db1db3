"""Packed rows' attention without a [T, T] mask: torch's variable-length flash attention over each example.

With `--packing` a row holds several examples, whose tokens must not attend to each other's. transformers turns the
position_ids that restart at every example into an explicit block-diagonal mask [B, 1, T, T]
(masking_utils.find_packed_sequence_indices, then sdpa_mask): 1 GiB of bool at 32K tokens (twice that once sdpa
makes it additive), O(T^2) where the rest of the step is O(T), and sdpa serves an explicit mask only with its
memory-efficient or math kernels (backward ~40 TFLOP/s at head dim 256 on an H100, against ~370 for the causal
cuDNN kernel: NOTES, run 62b). torch's `varlen_attn` (flash attention over concatenated sequences given their
cumulative offsets) takes the examples' boundaries instead: O(T) memory, and no work on the blocks between examples.

moetune registers it with transformers' attention interface as NAME and, on purpose, not with the mask interface:
for an attention function without a mask builder transformers builds no mask at all (masking_utils'
`_preprocess_mask_arguments` exits early), so neither the [T, T] mask nor the host sync of the packed-sequence
detection happens. The boundaries come as transformers' flash-attention keyword arguments (`cu_seq_lens_q/k`,
`max_length_q/k`), which every decoder layer passes on to its attention function; `moetune train --packing` puts
them in each batch (training/data.py `collate`). A call without them (the memory plan's probe, TRL's padding-free
batches, a plain forward) finds the segments in the position_ids as transformers would (one read of the device), or
takes each row as one causal sequence where there are none.

Used for `--packing` on CUDA GPUs of compute capability 8.0 or newer, in bf16 or fp16, where the model would run
"sdpa" (gpt-oss keeps flex attention: its sinks are not in flash attention) and torch has `varlen_attn`; elsewhere
packed rows keep transformers' mask. Not for generation: a key/value cache or a query shorter than its keys is
refused; a non-causal call (Qwen3-VL's vision blocks) goes to transformers' sdpa function. Checkpointed layers may
keep this attention's output as sdpa's (kept_attention.py).
"""

from __future__ import annotations

import functools
import inspect

import torch

__all__ = ["NAME", "boundaries", "packed_attention_forward", "reference_kernel", "register", "usable", "use_for"]

NAME = "moetune_packed_varlen"
DTYPES = (torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # flash attention's largest head dim


def _varlen():
    """torch's varlen_attn, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _parameters() -> frozenset[str]:
    return _parameters_of(_varlen())


@functools.cache  # (read at every attention call: inspect.signature costs ~20 us)
def _parameters_of(function) -> frozenset[str]:
    return frozenset() if function is None else frozenset(inspect.signature(function).parameters)


def kernel(query, key, value, cu_seq, max_len: int, scale: float, window: int | None) -> torch.Tensor:
    """Causal attention within each sequence of `cu_seq` (offsets into the rows of query [N, Hq, D] and of key and
    value [N, Hkv, D]): torch's varlen_attn, whose keyword arguments changed between torch versions (`is_causal` in
    the first, `window_size` since; `enable_gqa` in later ones). Tests put a stand-in here: torch has no CPU kernel."""
    function = _varlen()
    names = _parameters_of(function)
    kwargs = {}
    if "window_size" in names:
        kwargs["window_size"] = (-1 if window is None else window - 1, 0)
    elif window is not None:  # (usable() refuses sliding windows on such a torch)
        raise ValueError(f"{NAME}: this torch's varlen_attn has no window_size for a sliding window of {window}")
    else:
        kwargs["is_causal"] = True
    if "scale" in names:
        kwargs["scale"] = scale
    else:  # the default scale is 1/sqrt(D)
        query = query * (scale * query.shape[-1] ** 0.5)
    if key.shape[1] != query.shape[1]:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:  # (the kernel's own check of the head counts differs between versions)
            repeat = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    return function(query, key, value, cu_seq, cu_seq, max_len, max_len, **kwargs)


def reference_kernel(query, key, value, cu_seq, max_len: int, scale: float, window: int | None) -> torch.Tensor:
    """kernel's contract in torch's ops, one sdpa call per sequence: what the CPU checks (tests, the benchmark's
    --tiny) run in its place, torch having no varlen kernel there. Slow; not a fallback for training."""
    out = query.new_empty(*query.shape[:2], value.shape[-1])
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    offsets = cu_seq.tolist()
    for a, b in zip(offsets[:-1], offsets[1:]):
        q, k, v = (t[None, a:b].transpose(1, 2) for t in (query, key, value))  # [1, H, n, D]: sdpa's fused path
        if window is None:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:  # a query sees its own and the window - 1 keys before it
            i = torch.arange(b - a, device=query.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scale)
        out[a:b] = y[0].transpose(0, 1)
    return out


def usable(config, device: torch.device, dtype: torch.dtype, attn_implementation: str) -> bool:
    """Whether packed rows of this model can take the varlen kernel here (see the module docstring)."""
    if attn_implementation != "sdpa" or device.type != "cuda" or dtype not in DTYPES or _varlen() is None:
        return False
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dims = [getattr(text, name, None) for name in ("head_dim", "qk_head_dim", "v_head_dim")]
    if getattr(text, "head_dim", None) is None and getattr(text, "num_attention_heads", None):
        head_dims.append(text.hidden_size // text.num_attention_heads)  # (Qwen2-MoE, OLMoE, Mixtral)
    if getattr(text, "qk_nope_head_dim", None) is not None:  # latent attention: q/k heads are nope + rope wide
        head_dims.append(text.qk_nope_head_dim + text.qk_rope_head_dim)
    if any(d is not None and d > MAX_HEAD_DIM for d in head_dims):
        return False
    if getattr(text, "attention_dropout", 0.0):  # flash attention's varlen entry has no dropout
        return False
    sliding = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    return not sliding or "window_size" in _parameters()


def register() -> None:
    """Register the attention function under NAME with transformers (process-wide, once: kept_attention.py's
    wrapper around it stays)."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, packed_attention_forward)


def use_for(model, device: torch.device, dtype: torch.dtype) -> bool:
    """Switch `model` (a transformers model) to NAME where its packed rows can take the varlen kernel here;
    whether it did."""
    if not usable(model.config, device, dtype, model.config._attn_implementation):
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


def boundaries(lengths: list[list[int]], row_length: int) -> dict:
    """transformers' flash-attention keyword arguments for rows made of segments of these lengths (each row's
    lengths summing to row_length: its examples, then its padding as one segment), as int32 offsets into the
    rows laid end to end."""
    offsets, position = [0], 0
    for row in lengths:
        if sum(row) != row_length or any(n < 1 for n in row):
            raise ValueError(f"lengths: expected positive segment lengths summing to {row_length}, got {row}")
        for n in row:
            position += n
            offsets.append(position)
    cu = torch.tensor(offsets, dtype=torch.int32)
    longest = max(n for row in lengths for n in row)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _segments(position_ids, batch: int, length: int, device) -> tuple[torch.Tensor, int]:
    """(offsets, longest) of the segments transformers' packed-sequence detection finds in these position_ids
    (masking_utils.find_packed_sequence_indices), each row one causal sequence where it finds none. Reads the device:
    moetune train passes the offsets instead."""
    from transformers.masking_utils import find_packed_sequence_indices

    index = None if position_ids is None else find_packed_sequence_indices(position_ids.to(device).expand(batch, length))
    if index is None:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device), length
    starts = torch.ones(batch, length, dtype=torch.bool, device=device)
    starts[:, 1:] = index[:, 1:] != index[:, :-1]
    offsets = torch.cat([starts.reshape(-1).nonzero().flatten(), torch.tensor([batch * length], device=device)])
    return offsets.to(torch.int32), int((offsets[1:] - offsets[:-1]).max())


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
                             max_length_k=None, **kwargs):
    """transformers' attention-function interface: query [B, Hq, T, D], key and value [B, Hkv, T, D(v)] in, output
    [B, T, Hq, Dv] and no weights out. Self-attention: the keys' segments are the queries' (cu_seq_lens_k, which
    transformers' flash-attention path also takes, is not read; comparing it would wait for the GPU)."""
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):  # (Qwen3-VL's vision blocks): not packed text
        from transformers import AttentionInterface

        return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                                          scaling=scaling, sliding_window=sliding_window, **kwargs)
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise ValueError(f"{NAME}: packed-row attention needs as many keys as queries (no cache), got "
                         f"{key.shape[2]} keys for {length} queries")
    if dropout:
        raise ValueError(f"{NAME}: attention dropout is not supported (got {dropout}); train with it off")
    if attention_mask is not None:
        raise ValueError(f"{NAME}: segments come as cu_seq_lens_q/k, not an attention mask")
    if cu_seq_lens_q is None:  # (a caller of its own: TRL's padding-free batches, the memory plan's probe)
        cu_seq_lens_q, max_length_q = _segments(kwargs.get("position_ids"), batch, length, query.device)
    elif max_length_q is None:
        raise ValueError(f"{NAME}: cu_seq_lens_q needs max_length_q, the longest segment (an int)")
    if sliding_window is None:  # Qwen2-MoE's sliding layers set it on the module and leave it out of the call
        sliding_window = getattr(module, "sliding_window", None)
    if scaling is None:
        scaling = head_dim**-0.5
    v_dim = value.shape[-1]

    def rows(t):  # [B, H, T, D] -> [B*T, H, D]
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3])

    q, k, v = rows(query), rows(key), rows(value)
    if v_dim != head_dim:  # latent attention's narrower values: flash attention wants one head dim (zeros added to
        width = max(head_dim, v_dim)  # q and k leave the scores as they are; the scale is given)
        q, k, v = (t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))
                   for t in (q, k, v))
    out = kernel(q, k, v, cu_seq_lens_q.to(device=query.device, dtype=torch.int32), int(max_length_q), scaling,
                 sliding_window)
    return out[..., :v_dim].reshape(batch, length, heads, v_dim), None
