"""Checkpointed layers that keep their attention output (moetune/models/kept_attention.py): the recompute skips
the attention kernel, the gradients stay bitwise those of a full recompute, with offloading and with the experts'
recompute skip, and nothing is kept where it cannot be used."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moetune import FastMoEModel
from moetune.fast_model import _decoder_layers
from moetune.models import kept_attention

from .helpers import DEVICE, randomize_lora_B, spy_only_for_backward, token_batch

pytestmark = [
    pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning"),
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


def test_a_second_backward_replays_the_kept_outputs_again(checkpoint):
    model = _model(checkpoint("qwen3_moe"))
    layers = _decoder_layers(model)
    ids = token_batch().to(DEVICE)

    def two_backwards():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits  # (the fused loss allows one backward itself)
        logits[..., :10].square().mean().backward(retain_graph=True)
        logits[..., 10:].abs().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full = two_backwards()
    kept_attention.keep_attention(layers, len(layers))
    kept = two_backwards()
    assert all(torch.equal(kept[n], full[n]) for n in full)


def _attention(q, k, v, dropout_p=0.0):
    return kept_attention._keeping(torch.nn.functional.scaled_dot_product_attention, q, k, v,
                                   dropout_p=dropout_p, is_causal=True)


def _checkpointed_twice(context_fn, dropout_p=0.0, backward_thread=False):
    """Gradients of a checkpointed function with two fused attention calls (the second with dropout_p), and
    the attention kernels run."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))

    def function(q, k, v):
        first = _attention(q, k, v)
        return _attention(first * 2, k.sin(), v, dropout_p=dropout_p).cos().sum()

    with _CountAttention() as count:
        torch.manual_seed(1)
        kwargs = {"context_fn": context_fn} if context_fn else {}
        out = torch.utils.checkpoint.checkpoint(function, q, k, v, use_reentrant=False, **kwargs)
        if backward_thread:  # as the CUDA autograd engine does: the recompute on another thread
            import threading

            worker = threading.Thread(target=out.backward)
            worker.start()
            worker.join()
        else:
            out.backward()
    return [t.grad for t in (q, k, v)], count.runs


@pytest.mark.parametrize("backward_thread", [False, True], ids=["same-thread", "other-thread"])
def test_every_fused_call_of_a_checkpoint_replays_in_order(backward_thread):
    full, full_runs = _checkpointed_twice(None)
    kept, kept_runs = _checkpointed_twice(kept_attention._context_fn, backward_thread=backward_thread)
    if full_runs == 0:
        pytest.skip("no fused attention kernel for this shape on this device")
    assert (full_runs, kept_runs) == (4, 2)
    assert all(torch.equal(a, b) for a, b in zip(kept, full))


def test_a_call_with_dropout_runs_again_in_the_recompute():
    full, full_runs = _checkpointed_twice(None, dropout_p=0.3)
    kept, kept_runs = _checkpointed_twice(kept_attention._context_fn, dropout_p=0.3)
    if full_runs == 0:
        pytest.skip("no fused attention kernel for this shape on this device")
    # CPU runs SDPA with dropout through its math path (no fused op): only the first call is fused.
    assert kept_runs == full_runs - 1
    assert all(torch.equal(a, b) for a, b in zip(kept, full))


def test_dropout_is_read_from_the_op_schema_and_such_calls_run_again():
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    q = torch.randn(1, 2, 16, 8)
    assert kept_attention._has_dropout(op, (q, q, q, 0.3), {})
    assert kept_attention._has_dropout(op, (q, q, q), {"dropout_p": 0.3})
    assert not kept_attention._has_dropout(op, (q, q, q), {})
    assert not kept_attention._has_dropout(torch.ops.aten.mm.default, (q, q), {})
    # A call stored as "run again" (the forward had dropout) reaches the kernel in the recompute.
    stash = kept_attention._Stash()
    stash.store(op, kept_attention._RERUN)
    assert stash.nbytes == 0
    with kept_attention._Phase(stash, True), _CountAttention() as count:
        out = kept_attention._StoreOrReplay(stash)
        with out:
            replayed = op(q, q, q)[0]
    assert count.runs == 1 and torch.equal(replayed, op(q, q, q)[0])


def test_a_recompute_that_calls_another_kernel_says_so():
    stash = kept_attention._Stash()
    forward, recompute = kept_attention._Phase(stash, False), kept_attention._Phase(stash, True)
    q = torch.randn(1, 2, 16, 8)
    with forward:
        _attention(q, q, q)
    if not stash.entries:
        pytest.skip("no fused attention kernel for this shape on this device")
    stash.entries[0] = (torch.ops.aten.mm.default, stash.entries[0][1])  # as if the forward ran another op
    with recompute, pytest.raises(RuntimeError, match="kept attention: the recompute ran aten"):
        _attention(q, q, q)


def test_nothing_is_kept_where_it_cannot_be_used(checkpoint):
    eager = _model(checkpoint("qwen3_moe"), attn_implementation="eager")  # no fused attention op to keep
    assert kept_attention.keep_attention(_decoder_layers(eager), 2) == 0
    unchecked = _model(checkpoint("qwen3_moe"), use_gradient_checkpointing=False)  # no checkpoint function
    assert kept_attention.keep_attention(_decoder_layers(unchecked), 2) == 0
    model = _model(checkpoint("qwen3_moe"))
    layers = _decoder_layers(model)
    reentrant = layers[0]._gradient_checkpointing_func
    layers[0]._gradient_checkpointing_func = functools.partial(reentrant.func, use_reentrant=True)
    assert kept_attention.keep_attention(layers, 2) == 1  # the reentrant checkpoint takes no context_fn
    layers[0]._gradient_checkpointing_func = reentrant
    layers[0].self_attn.attention_dropout = 0.1  # transformers passes it to SDPA in training
    assert kept_attention.keep_attention(layers, 2) == 1
    layers[0].self_attn.attention_dropout = 0.0
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="count: expected an integer >= 0"):
            kept_attention.keep_attention(layers, bad)
    with pytest.raises(ValueError, match="layers: expected a list of decoder layers"):
        kept_attention.keep_attention(model, 1)
    # Without checkpointing the wrapped sdpa function runs as before (eval, no grad: no checkpoint call).
    assert kept_attention.keep_attention(layers, 2) == 2
    ids = token_batch().to(DEVICE)
    with torch.no_grad():
        kept_logits = model.eval()(input_ids=ids).logits
    kept_attention.keep_attention(layers, 0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, kept_logits)


def test_the_setting_follows_the_checkpoint_function_through_offloading(checkpoint):
    from moetune.training.offload import disable_offloaded_checkpointing

    model = _model(checkpoint("qwen3_moe"), offload_checkpoints=True)
    layers = _decoder_layers(model)
    assert kept_attention.keep_attention(layers, 2) == 2
    disable_offloaded_checkpointing(model)  # back to the standard checkpoint: still keeping
    assert kept_attention.kept_attention_layers(layers) == 2
    model = _model(checkpoint("qwen3_moe"), offload_checkpoints=True)
    layers = _decoder_layers(model)
    kept_attention.keep_attention(layers, 2)
    kept_attention.keep_attention(layers, 0)
    disable_offloaded_checkpointing(model)  # nothing left keeping in the restored function either
    assert kept_attention.kept_attention_layers(layers) == 0
    base = model.get_base_model()  # transformers' own enable (renamed in 5.2x): a fresh checkpoint function
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    assert kept_attention.kept_attention_layers(layers) == 0


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


@pytest.mark.parametrize("kernel", ["stand-in", "torch-op"])
def test_packed_rows_varlen_attention_is_kept_too(kernel, checkpoint, monkeypatch, request):
    """--packing's varlen attention (packed_attention.py), kept and replayed as sdpa's with the gradients bitwise
    those of a full recompute: through the tests' stand-in (one fused sdpa op per example), and through torch's own
    varlen op (a custom op: one call each way, as on a GPU; its CPU kernels are the tests')."""
    import transformers

    from moetune.models import packed_attention

    from .helpers import stand_in_varlen

    lengths = [[3, 5, 1], [9]]
    if kernel == "stand-in":
        monkeypatch.setattr(packed_attention, "kernel", stand_in_varlen)
        ops_per_call = 4  # examples and padding segments of both rows
    elif torch.cuda.is_available():
        pytest.skip("CPU kernels for the op")
    else:
        assert request.getfixturevalue("varlen_op_on_cpu") in kept_attention.ATTENTION_OPS
        ops_per_call = 1
    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, packed_attention.NAME,
                        packed_attention.packed_attention_forward)
    model = _model(checkpoint("qwen3_moe"))
    model.get_base_model().set_attn_implementation(packed_attention.NAME)
    ids = token_batch(2, 9).to(DEVICE)
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in lengths], device=DEVICE)
    bounds = packed_attention.boundaries(lengths, 9)

    def step():
        model.zero_grad(set_to_none=True)
        with _CountAttention() as count:
            model(input_ids=ids, labels=ids, position_ids=position_ids, use_cache=False, **bounds).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, count.runs

    layers = _decoder_layers(model)
    full, full_runs = step()
    if full_runs == 0:
        pytest.skip("no fused attention kernel runs for this shape on this device")
    assert full_runs == 2 * len(layers) * ops_per_call  # forward and recompute
    assert kept_attention.keep_attention(layers, len(layers)) == len(layers)
    kept_attention.reset_kept_bytes()
    kept, kept_runs = step()
    assert kept_runs == len(layers) * ops_per_call and kept_attention.largest_kept_bytes() > 0
    for name in full:
        assert torch.equal(kept[name], full[name]), name
    kept_attention.keep_attention(layers, 0)
