"""moetune/models/fast_sinks.py: gpt-oss's flex attention with the sink kernel, against transformers' attention.

Flex attention has no backward on CPU, so the plumbing tests use a stand-in that computes flex attention's (out, lse)
with torch's ops from the block mask's mask_mod; everything else (transformers' block masks, the wrapper, the kernel:
compiled on a GPU, in Triton's interpreter on CPU) is the real path, on DEVICE. The GPU test runs the real flex
attention against transformers' own function.
"""

from __future__ import annotations

import types

import pytest
import torch
import transformers

from moetune import FastMoEModel
from moetune.kernels import attention_sinks
from moetune.models import fast_sinks

from .helpers import DEVICE, needs_triton, randomize_lora_B, relative_error, save_checkpoint, token_batch


@pytest.fixture
def registry(monkeypatch):
    """transformers' attention registry, its "flex_attention" entry (and the mask builder's) restored after the
    test."""
    from transformers.masking_utils import AttentionMaskInterface

    mapping = transformers.AttentionInterface._global_mapping
    monkeypatch.setitem(mapping, "flex_attention", mapping["flex_attention"])
    masks = AttentionMaskInterface._global_mapping
    monkeypatch.setitem(masks, "flex_attention", masks["flex_attention"])
    fast_sinks.uninstall_fast_sinks()
    return mapping


STAND_IN_CALLS: list[dict] = []  # the keywords of each call, cleared by stand_in_flex


def flex_stand_in(query, key, value, training=False, score_mod=None, block_mask=None, enable_gqa=False, scale=None,
                  kernel_options=None, return_aux=None, return_lse=False):
    """Flex attention's (out, lse) with torch's ops: the block mask's mask_mod evaluated for every query and key."""
    STAND_IN_CALLS.append(dict(training=training, score_mod=score_mod, block_mask=block_mask, enable_gqa=enable_gqa,
                               scale=scale, kernel_options=kernel_options, return_aux=return_aux,
                               return_lse=return_lse))
    B, H, T, D = query.shape
    key = key.repeat_interleave(H // key.shape[1], 1)
    value = value.repeat_interleave(H // value.shape[1], 1)
    scores = (query @ key.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    index = {"dtype": torch.long, "device": query.device}
    allowed = block_mask.mask_mod(torch.arange(B, **index).view(B, 1, 1, 1), torch.zeros(1, 1, 1, 1, **index),
                                  torch.arange(T, **index).view(1, 1, T, 1),
                                  torch.arange(key.shape[2], **index).view(1, 1, 1, -1))
    scores = scores.float().masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.softmax(scores, -1).to(query.dtype) @ value
    return (out, types.SimpleNamespace(lse=lse)) if return_aux is not None else (out, lse)


@pytest.fixture
def stand_in_flex(monkeypatch, registry):
    """The stand-in as transformers' compiled flex attention, the fused call allowed on CPU; counts kernel calls."""
    from transformers.integrations import flex_attention

    monkeypatch.setattr(flex_attention, "compile_friendly_flex_attention", flex_stand_in)
    monkeypatch.setattr(fast_sinks, "DEVICE_TYPES", ("cuda", "cpu"))
    STAND_IN_CALLS.clear()
    calls = count_calls(monkeypatch, attention_sinks, "apply_sinks")
    assert fast_sinks.install_fast_sinks()
    return calls


def count_calls(monkeypatch, module, name) -> list:
    """module.name wrapped for the test: the returned list gets its first argument's shape at every call."""
    calls, real = [], getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    return save_checkpoint("gpt_oss", str(tmp_path_factory.mktemp("gpt_oss")))


@pytest.fixture(scope="module")
def gpt_oss_flex_dir(tmp_path_factory):
    """The tiny gpt-oss at head dim 16: torch's compiled flex attention refuses less (run 62b)."""
    return save_checkpoint("gpt_oss", str(tmp_path_factory.mktemp("gpt_oss_flex")), head_dim=16)


def lora_model(model_dir, attn_implementation, device=DEVICE, dtype=torch.float32):
    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn_implementation,
                                            device_map=device if device != "cpu" else None)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    randomize_lora_B(model)
    return model


def loss_and_grads(model, ids, extra=()):
    """The loss and the gradients of every trainable parameter and of `extra` (names of other parameters)."""
    params = dict(model.named_parameters())
    for name in extra:
        params[name].requires_grad_(True)
    names = [n for n, p in params.items() if p.requires_grad]
    loss = model(input_ids=ids, labels=ids).loss
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))


@needs_triton
def test_tiny_gpt_oss_with_flex_and_the_kernel_matches_eager_attention(gpt_oss_dir, stand_in_flex, monkeypatch):
    monkeypatch.setattr(fast_sinks, "CAUSAL_ON_FUSED_ATTENTION", False)  # every layer on flex attention here
    ids = token_batch().to(DEVICE)
    eager = lora_model(gpt_oss_dir, "eager").train()
    sinks = [n for n, _ in eager.named_parameters() if n.endswith("self_attn.sinks")]  # trained here, to check them
    assert sinks
    expected_loss, expected = loss_and_grads(eager, ids, sinks)
    model = lora_model(gpt_oss_dir, "flex_attention").train()  # train: the layers are checkpointed
    assert fast_sinks.runs_flex_with_sinks(model)
    loss, grads = loss_and_grads(model, ids, sinks)
    assert len(stand_in_flex) == 2 * model.config.num_hidden_layers  # every layer, again in its recompute
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    assert grads.keys() == expected.keys()
    for name in expected:
        assert relative_error(grads[name], expected[name]) < 1e-4, name


def _attention_module():
    return types.SimpleNamespace(training=True)


def _inputs(heads=4, kv_heads=2, tokens=8, dim=16, sinks=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, tokens, dim, generator=gen).to(DEVICE, dtype) for n in (heads, kv_heads, kv_heads))
    from torch.nn.attention.flex_attention import create_block_mask

    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, tokens, tokens, device=DEVICE)
    return q, k, v, mask, (torch.randn(heads, generator=gen).to(DEVICE) if sinks else None)


@pytest.mark.parametrize("case", ["no-sinks", "softcap", "dense-mask", "three-heads", "dropout", "device",
                                  "position-bias", "compiling"])
def test_calls_it_cannot_fuse_go_to_transformers_unchanged(stand_in_flex, monkeypatch, case):
    q, k, v, mask, sinks = _inputs(heads=3 if case == "three-heads" else 4, kv_heads=1 if case == "three-heads" else 2,
                                   sinks=case != "no-sinks")
    kwargs = {"scaling": 0.25, "softcap": 30.0 if case == "softcap" else None, "s_aux": sinks,
              "dropout": 0.1 if case == "dropout" else 0.0, "sliding_window": None}
    if case == "dense-mask":
        mask = torch.zeros(1, 1, 8, 8, device=DEVICE)
    if case == "device":  # a device type the kernel is not for
        monkeypatch.setattr(fast_sinks, "DEVICE_TYPES", ())
    if case == "position-bias":
        kwargs["position_bias"] = torch.zeros(1, 4, 8, 8, device=DEVICE)
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    seen = []

    def original(*args, **kw):
        seen.append((args, kw))
        return "transformers"

    module = _attention_module()
    assert fast_sinks._fused_flex_attention(original, module, q, k, v, mask, **kwargs) == "transformers"
    assert seen == [((module, q, k, v, mask), kwargs)] and not stand_in_flex and not STAND_IN_CALLS


@needs_triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_fusable_call_passes_flex_attention_what_transformers_passes(stand_in_flex, training):
    from transformers.integrations.flex_attention import get_flex_attention_lse_kwargs

    q, k, v, mask, sinks = _inputs()
    module = types.SimpleNamespace(training=training)
    options = {"BLOCK_M": 64}
    out, weights = fast_sinks._fused_flex_attention(None, module, q, k, v, mask, scaling=0.3, s_aux=sinks,
                                                    dropout=0.0, sliding_window=None, kernel_options=options)
    (call,) = STAND_IN_CALLS
    lse_request = get_flex_attention_lse_kwargs(True)
    assert call["block_mask"] is mask and call["scale"] == 0.3 and call["enable_gqa"] is True
    assert call["training"] is training and call["kernel_options"] is options and call["score_mod"] is None
    for name, value in lse_request.items():  # return_aux=AuxRequest(lse=True) (torch >= 2.9) or return_lse=True
        assert call[name] == value
    raw, lse = flex_stand_in(q, k, v, block_mask=mask, scale=0.3)
    shares = torch.sigmoid(lse - sinks.view(1, -1, 1))  # the keys' share of a softmax that includes the sink
    assert out.shape == (1, 8, 4, 16) and out.is_contiguous()
    assert torch.allclose(out, (raw * shares.unsqueeze(-1)).transpose(1, 2), atol=1e-6)
    assert torch.equal(weights, lse) and len(stand_in_flex) == 1


def test_install_wraps_once_and_uninstall_restores(registry):
    original = registry["flex_attention"]
    assert fast_sinks.install_fast_sinks() and fast_sinks.install_fast_sinks()
    assert fast_sinks.wrapped() and registry["flex_attention"].args[0] is original
    assert fast_sinks.uninstall_fast_sinks() and registry["flex_attention"] is original
    assert not fast_sinks.uninstall_fast_sinks()


def test_uninstall_leaves_a_later_wrapper_alone(registry):
    fast_sinks.install_fast_sinks()
    later = lambda *args, **kwargs: registry["flex_attention"](*args, **kwargs)  # noqa: E731
    transformers.AttentionInterface.register("flex_attention", later)
    assert not fast_sinks.wrapped() and not fast_sinks.uninstall_fast_sinks()
    assert registry["flex_attention"] is later


def test_install_without_transformers_flex_function(registry, monkeypatch):
    monkeypatch.delitem(registry, "flex_attention")
    assert not fast_sinks.install_fast_sinks() and not fast_sinks.wrapped()


def test_which_models_run_flex_with_sinks(gpt_oss_dir, tmp_path):
    flex, _ = FastMoEModel.from_pretrained(gpt_oss_dir, dtype=torch.float32, attn_implementation="flex_attention")
    eager, _ = FastMoEModel.from_pretrained(gpt_oss_dir, dtype=torch.float32, attn_implementation="eager")
    qwen, _ = FastMoEModel.from_pretrained(save_checkpoint("qwen3_moe", str(tmp_path / "q")), dtype=torch.float32,
                                           attn_implementation="flex_attention")
    assert fast_sinks.runs_flex_with_sinks(flex)
    assert not fast_sinks.runs_flex_with_sinks(eager) and not fast_sinks.runs_flex_with_sinks(qwen)


@pytest.mark.parametrize("attention, expected", [("flex_attention", True), ("eager", False)])
def test_from_pretrained_wraps_flex_attention_on_cuda_for_a_model_with_sinks(gpt_oss_dir, tmp_path, registry,
                                                                              monkeypatch, attention, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the rest of the model stays on the CPU
    off = dict(fused_norms=False, fused_rotary=False, fused_router=False, fused_mlp=False)  # no other swaps
    FastMoEModel.from_pretrained(save_checkpoint("qwen3_moe", str(tmp_path / "q")), dtype=torch.float32,
                                 attn_implementation="flex_attention", fused_sinks=True, **off)
    assert not fast_sinks.wrapped()  # no sinks
    FastMoEModel.from_pretrained(gpt_oss_dir, dtype=torch.float32, attn_implementation=attention, device_map="cpu",
                                 fused_sinks=False, **off)
    assert not fast_sinks.wrapped()
    FastMoEModel.from_pretrained(gpt_oss_dir, dtype=torch.float32, attn_implementation=attention, device_map="cpu",
                                 **off)
    assert fast_sinks.wrapped() == expected  # on by default (runs 62-63)
    assert fast_sinks.CAUSAL_ON_FUSED_ATTENTION  # and the full-attention layers on cuDNN (run 63)


def test_fused_sinks_must_be_a_bool(gpt_oss_dir):
    with pytest.raises(ValueError, match="fused_sinks") as error:
        FastMoEModel.from_pretrained(gpt_oss_dir, fused_sinks="on")
    assert "\n" not in str(error.value)


def test_turning_it_off_after_an_earlier_wrap_says_how(gpt_oss_dir, registry):
    fast_sinks.install_fast_sinks()
    with pytest.warns(UserWarning, match="uninstall_fast_sinks"):
        FastMoEModel.from_pretrained(gpt_oss_dir, dtype=torch.float32, attn_implementation="flex_attention",
                                     fused_sinks=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True], ids=["flex", "causal-on-cudnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_real_flex_attention_with_the_kernel_matches_transformers_on_the_gpu(gpt_oss_flex_dir, registry, monkeypatch,
                                                                             dtype, causal):
    """transformers' flex path against moetune's: the sink kernel after real flex attention, and with `causal` the
    full-attention layer on cuDNN (bf16; fp32 keeps flex attention, which cuDNN does not compute in)."""
    from moetune.kernels import causal_sink_attention

    monkeypatch.setattr(fast_sinks, "CAUSAL_ON_FUSED_ATTENTION", causal)
    fused_calls = count_calls(monkeypatch, causal_sink_attention, "causal_sink_attention")
    ids = token_batch().cuda()

    def run(fused):
        fast_sinks.uninstall_fast_sinks()
        model, _ = FastMoEModel.from_pretrained(gpt_oss_flex_dir, dtype=dtype, attn_implementation="flex_attention",
                                                device_map="cuda", fused_sinks=fused)
        assert fast_sinks.wrapped() == fused
        model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
        randomize_lora_B(model)
        sinks = [n for n, _ in model.named_parameters() if n.endswith("self_attn.sinks")]
        return loss_and_grads(model, ids, sinks)

    expected_loss, expected = run(False)
    loss, grads = run(True)
    model_calls = [shape for shape in fused_calls if shape[2] == ids.shape[1]]  # not the probe's
    assert bool(model_calls) == (causal and dtype == torch.bfloat16)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(loss, expected_loss, rtol=tolerance)
    for name in expected:
        assert relative_error(grads[name].float(), expected[name].float()) < tolerance, name


def _flex_mask(**overrides):
    """transformers' flex mask builder as create_causal_mask calls it (keywords), for 8 queries and keys."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    kwargs = dict(batch_size=1, q_length=8, kv_length=8, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                  attention_mask=None, device=DEVICE)
    return ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"](**{**kwargs, **overrides})


def _plain(mask) -> bool:
    return getattr(mask, fast_sinks._PLAIN_CAUSAL, False)


def test_the_mask_builder_marks_plain_causal_masks_only(registry):
    from transformers.masking_utils import sliding_window_causal_mask_function

    assert not _plain(_flex_mask())  # not installed
    assert fast_sinks.install_fast_sinks()
    assert _plain(_flex_mask())
    padding = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    padding[0, :2] = False
    assert not _plain(_flex_mask(attention_mask=padding))  # any 2D mask, even all ones: no sync to look inside
    assert not _plain(_flex_mask(mask_function=sliding_window_causal_mask_function(4)))
    assert not _plain(_flex_mask(q_length=4, q_offset=4))
    assert not _plain(_flex_mask(q_offset=torch.tensor(0)))  # a tensor offset would need a sync
    assert fast_sinks.uninstall_fast_sinks()
    assert not _plain(_flex_mask())


@needs_triton
def test_tiny_gpt_oss_with_its_full_layers_on_fused_attention_matches_eager(gpt_oss_dir, stand_in_flex, monkeypatch):
    """The full-attention layer on torch's fused attention with the sinks after it, the sliding one on (stand-in)
    flex attention with the sink kernel: eager attention's loss and gradients, sinks included, through the
    checkpointed layers' recompute, the fused path's check (probe) run from inside the first checkpointed forward.
    On a GPU in bf16 (cuDNN computes in fp16 / bf16 only)."""
    from moetune.kernels import causal_sink_attention

    monkeypatch.setattr(fast_sinks, "CAUSAL_ON_FUSED_ATTENTION", True)
    causal_sink_attention.probe.cache_clear()
    dtype, tolerance = (torch.bfloat16, 3e-2) if DEVICE == "cuda" else (torch.float32, 1e-4)
    fused = count_calls(monkeypatch, causal_sink_attention, "causal_sink_attention")
    ids = token_batch().to(DEVICE)
    eager = lora_model(gpt_oss_dir, "eager", dtype=dtype).train()
    sinks = [n for n, _ in eager.named_parameters() if n.endswith("self_attn.sinks")]
    expected_loss, expected = loss_and_grads(eager, ids, sinks)
    model = lora_model(gpt_oss_dir, "flex_attention", dtype=dtype).train()  # train: the layers are checkpointed
    loss, grads = loss_and_grads(model, ids, sinks)
    layer_types = model.config.layer_types
    fused = [shape for shape in fused if shape[2] == ids.shape[1]]  # the model's calls, not the probe's
    assert len(fused) == 2 * layer_types.count("full_attention")  # the forward and the recompute
    assert len(stand_in_flex) == 2 * layer_types.count("sliding_attention")  # the sink kernel after flex
    assert causal_sink_attention.probe(DEVICE, 0 if DEVICE == "cuda" else None, dtype) is None
    assert torch.allclose(loss.float(), expected_loss.float(), rtol=tolerance)
    for name in expected:
        assert relative_error(grads[name].float(), expected[name].float()) < tolerance, name


@needs_triton
def test_a_padded_batch_keeps_flex_attention(gpt_oss_dir, stand_in_flex, monkeypatch):
    monkeypatch.setattr(fast_sinks, "CAUSAL_ON_FUSED_ATTENTION", True)
    from moetune.kernels import causal_sink_attention

    monkeypatch.setattr(causal_sink_attention, "causal_sink_attention", None)  # would raise if called
    ids = token_batch().to(DEVICE)
    model = lora_model(gpt_oss_dir, "flex_attention")
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask, labels=ids).loss)
    assert len(stand_in_flex) == model.config.num_hidden_layers


@needs_triton
def test_only_a_marked_mask_without_a_window_leaves_flex_attention(registry, monkeypatch):
    fused_dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # cuDNN computes in fp16 / bf16 only
    q, k, v, _, _ = _inputs(dtype=fused_dtype)
    monkeypatch.setattr(fast_sinks, "CAUSAL_ON_FUSED_ATTENTION", True)
    fast_sinks.install_fast_sinks()
    marked, unmarked = _flex_mask(), _flex_mask(q_length=8, kv_length=8, q_offset=0, kv_offset=0,
                                                attention_mask=torch.ones(1, 8, dtype=torch.bool, device=DEVICE))
    assert fast_sinks._runs_causal_on_fused_attention(q, k, v, marked, None)
    assert not fast_sinks._runs_causal_on_fused_attention(q, k, v, marked, 128)  # a sliding layer's window
    assert not fast_sinks._runs_causal_on_fused_attention(q, k, v, unmarked, None)
    assert not fast_sinks._runs_causal_on_fused_attention(q, k[:, :, :4], v[:, :, :4], marked, None)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # a user's opt-out of torch's fused attention holds here too
        assert not fast_sinks._runs_causal_on_fused_attention(q, k, v, marked, None)
    assert fast_sinks._runs_causal_on_fused_attention(q, k, v, marked, None)
    if DEVICE == "cuda":  # the shapes and dtypes cuDNN refuses keep flex attention
        assert not fast_sinks._runs_causal_on_fused_attention(*_inputs(dtype=torch.float32)[:3], marked, None)
        assert not fast_sinks._runs_causal_on_fused_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], marked, None)
    monkeypatch.setattr(fast_sinks, "CAUSAL_ON_FUSED_ATTENTION", False)
    assert not fast_sinks._runs_causal_on_fused_attention(q, k, v, marked, None)
