"""Checkpointed layers that keep their attention output (moetune/models/kept_attention.py): the recompute skips
the attention kernel, the gradients stay bitwise those of a full recompute, with offloading and with the experts'
recompute skip, and nothing is kept where it cannot be used."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetune import FastMoEModel
from moetune.fast_model import _decoder_layers
from moetune.models import kept_attention

from .helpers import DEVICE, randomize_lora_B, spy_only_for_backward, token_batch

pytestmark = [
    pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:lora_dropout.*:UserWarning"),
]


def _model(model_dir: str, attn_implementation: str = "sdpa", **kwargs):
    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32, device_map=DEVICE,
                                            attn_implementation=attn_implementation)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, lora_dropout=0.0, **kwargs)
    randomize_lora_B(model)
    return model.train()


class _CountAttention(TorchDispatchMode):
    """Counts the fused attention kernels that really run (a replayed output never reaches this outer mode)."""

    def __init__(self):
        super().__init__()
        self.runs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.runs += func in kept_attention.ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def _step(model, ids) -> tuple[dict[str, torch.Tensor], int]:
    """(LoRA gradients, attention kernels run) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    with _CountAttention() as count:
        model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, count.runs


@pytest.mark.parametrize("kwargs", [{}, {"offload_checkpoints": True}], ids=["plain", "offload"])
def test_kept_attention_skips_the_kernel_in_the_recompute_with_the_same_gradients(kwargs, checkpoint, monkeypatch):
    model = _model(checkpoint("qwen3_moe"), **kwargs)
    ids = token_batch().to(DEVICE)
    layers = _decoder_layers(model)
    full, full_runs = _step(model, ids)
    if full_runs == 0:  # CUDA runs SDPA's math path for the tiny head dim in fp32: nothing to keep
        pytest.skip("no fused attention kernel runs for this shape on this device")
    assert full_runs == 2 * len(layers)  # forward and recompute

    only_for_backward = spy_only_for_backward(monkeypatch)
    assert kept_attention.keep_attention(layers, len(layers)) == len(layers)
    assert kept_attention.kept_attention_layers(layers) == len(layers)
    kept_attention.reset_kept_bytes()
    kept, kept_runs = _step(model, ids)
    assert kept_runs == len(layers)  # forward only: the recompute took the kept outputs
    assert only_for_backward.count(True) == only_for_backward.count(False) > 0  # the experts' recompute skip too
    assert kept.keys() == full.keys()
    for name in full:
        assert torch.equal(kept[name], full[name]), name
    config = model.config
    batch, length = ids.shape
    output = batch * config.num_attention_heads * length * config.head_dim * 4  # fp32 attention output
    assert kept_attention.largest_kept_bytes() >= output  # plus its log-sum-exp

    assert kept_attention.keep_attention(layers, 1) == 1  # the first layer only
    _, runs = _step(model, ids)
    assert runs == 2 * len(layers) - 1
    assert kept_attention.keep_attention(layers, 0) == 0
    again, runs = _step(model, ids)
    assert runs == 2 * len(layers) and all(torch.equal(again[n], full[n]) for n in full)


def test_a_second_backward_through_kept_attention_says_why(checkpoint):
    model = _model(checkpoint("qwen3_moe"))
    layers = _decoder_layers(model)
    kept_attention.keep_attention(layers, len(layers))
    ids = token_batch().to(DEVICE)
    if DEVICE == "cuda":
        pytest.skip("CUDA runs SDPA's math path for the tiny head dim in fp32: nothing is kept")
    loss = model(input_ids=ids).logits.square().mean()  # (the fused loss allows one backward itself)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="kept attention: the recompute asked for an attention output"):
        loss.backward()


def test_nothing_is_kept_where_it_cannot_be_used(checkpoint):
    eager = _model(checkpoint("qwen3_moe"), attn_implementation="eager")  # no fused attention op to keep
    assert kept_attention.keep_attention(_decoder_layers(eager), 2) == 0
    unchecked = _model(checkpoint("qwen3_moe"), use_gradient_checkpointing=False)  # no checkpoint function
    assert kept_attention.keep_attention(_decoder_layers(unchecked), 2) == 0
    # Without checkpointing the wrapped attention module runs as before (eval, no grad: no checkpoint call).
    model = _model(checkpoint("qwen3_moe"))
    kept_attention.keep_attention(_decoder_layers(model), 2)
    ids = token_batch().to(DEVICE)
    with torch.no_grad():
        kept_logits = model.eval()(input_ids=ids).logits
    kept_attention.keep_attention(_decoder_layers(model), 0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, kept_logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kept_attention_on_the_gpu_in_bfloat16(tmp_path):
    """The fused kernels CUDA picks for bf16 at head dim 64 (flash or cuDNN): kept in forward, the recompute runs
    none, gradients within the run-to-run noise of a full recompute (their backward may use atomics)."""
    import transformers

    from .helpers import relative_error
    from .tiny import tiny_config

    config = tiny_config("qwen3_moe")
    config.head_dim, config.num_hidden_layers, config.mlp_only_layers = 64, 3, []
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(tmp_path)
    model, _ = FastMoEModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16, device_map="cuda",
                                            attn_implementation="sdpa")
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, lora_dropout=0.0).train()
    randomize_lora_B(model)
    layers = _decoder_layers(model)
    ids = token_batch(2, 120).cuda()  # within the tiny config's 128 positions
    full, runs = _step(model, ids)
    again, _ = _step(model, ids)
    assert runs == 2 * len(layers)
    assert kept_attention.keep_attention(layers, len(layers)) == len(layers)
    kept, runs = _step(model, ids)
    assert runs == len(layers)
    for name in full:
        noise = relative_error(again[name], full[name])
        assert relative_error(kept[name], full[name]) <= max(4 * noise, 1e-6), name
