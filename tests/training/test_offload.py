"""Offloaded checkpointing (moetune/training/offload.py): the same loss and gradients as torch.utils.checkpoint,
layer inputs released after forward, the copy back one layer ahead, enable/disable on transformers models."""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
import transformers
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from moetune import FastMoEModel
from moetune.training import offload
from moetune.training.offload import (
    disable_offloaded_checkpointing,
    enable_offloaded_checkpointing,
    offloaded_checkpoint,
)

from ..models.helpers import (
    checkpoint,  # noqa: F401  (session fixture)
    randomize_lora_B,
    relative_error,
    token_batch,
)
from ..models.tiny import VOCAB, tiny_config
from .helpers import lm_training_step

pytestmark = [
    pytest.mark.filterwarnings("ignore:target_modules.*:UserWarning"),
]


def _decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _peft_model(model_dir_or_config, **kwargs):
    model, _ = FastMoEModel.from_pretrained(model_dir_or_config, dtype=torch.float32)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, **kwargs)
    randomize_lora_B(model)  # B = 0 would make every lora_A gradient zero
    disable_offloaded_checkpointing(model)  # the reference: torch's checkpoint, whatever get_peft_model chose
    return model.train()


def _step(model, ids, embeds: bool = False):
    """(loss, {trainable name: grad}, [layer input still alive after forward, per layer]) of one step.

    embeds: pass inputs_embeds that do not require grad (transformers' enable_input_require_grads hook on the
    embedding makes the embedding output a leaf that requires grad, and peft registers it a second time)."""
    model.zero_grad(set_to_none=True)
    inputs = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
             for layer in _decoder_layers(model)]
    torch.manual_seed(3)  # the same LoRA dropout masks in both runs
    if embeds:  # no reference kept here: the layer input may be freed after forward
        out = model(inputs_embeds=model.get_input_embeddings()(ids).detach(), labels=ids)
    else:
        out = model(input_ids=ids, labels=ids)
    for hook in hooks:
        hook.remove()
    gc.collect()
    alive = [ref() is not None for ref in inputs]
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, alive


# --- on the models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, input_requires_grad", [
    ("qwen3_moe", True),  # transformers' default: the embedding output is a leaf that requires grad
    ("qwen3_moe", False),  # inputs_embeds: the first layer's input needs no grad, its LoRA weights still do
    ("gpt_oss", True),  # more layer kwargs: sliding-window and full masks, sinks, biased experts
    ("gpt_oss", False),
])
def test_loss_and_lora_gradients_are_those_of_checkpointing(model_type, input_requires_grad, checkpoint):
    # Half the cases with LoRA on the experts, half with dropout (the recompute replays the RNG), which PEFT allows
    # on Linear LoRA only.
    dropout = not input_requires_grad
    kwargs = dict(lora_dropout=0.1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")) if dropout else {}
    model = _peft_model(checkpoint(model_type), **kwargs)
    ids, embeds = token_batch(), not input_requires_grad
    loss, grads, alive = _step(model, ids, embeds)
    assert alive == [True, True]  # checkpointing keeps every layer input until backward

    assert enable_offloaded_checkpointing(model) == 2
    offloaded_loss, offloaded_grads, offloaded_alive = _step(model, ids, embeds)
    # Exactly equal: the same autograd nodes run on the same values; only where the inputs wait changes.
    assert torch.equal(offloaded_loss, loss)
    assert any("experts.lora" in n for n in grads) != dropout and any("proj.lora" in n for n in grads)
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name
    first = [g for n, g in offloaded_grads.items() if ".layers.0." in n]
    assert first and all(g.abs().sum() > 0 for g in first)
    # Released after forward. A leaf that requires grad (the embedding output under transformers'
    # enable_input_require_grads) is held by its gradient accumulator whatever the checkpointing does.
    assert offloaded_alive == [input_requires_grad, False]

    assert disable_offloaded_checkpointing(model) == 2
    _, _, alive = _step(model, ids, embeds)
    assert alive == [True, True]


def test_eval_and_no_grad_forward(checkpoint):
    model = _peft_model(checkpoint("qwen3_moe"))
    ids = token_batch()
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    enable_offloaded_checkpointing(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)  # eval: no checkpointing at all
        model.train()  # checkpointing on, but nothing saved under no_grad
        assert torch.equal(model(ids).logits, expected)


def test_enable_and_disable_on_peft_and_bare_models(checkpoint):
    model = _peft_model(checkpoint("qwen3_moe"))
    layers = _decoder_layers(model)
    standard = [layer._gradient_checkpointing_func for layer in layers]
    bare = model.get_base_model()
    assert enable_offloaded_checkpointing(bare) == 2
    assert enable_offloaded_checkpointing(model) == 2  # idempotent: the standard function is kept once
    for layer in layers:
        func = layer._gradient_checkpointing_func
        assert func.func is offloaded_checkpoint and func.keywords == {}  # use_reentrant=False dropped
    assert disable_offloaded_checkpointing(model) == 2
    assert [layer._gradient_checkpointing_func for layer in layers] == standard
    assert disable_offloaded_checkpointing(bare) == 0


@pytest.mark.parametrize("checkpoint_layers", [0, 1])
def test_layers_a_partial_plan_leaves_out_offload_once_a_plan_checkpoints_them(checkpoint_layers, checkpoint):
    """get_peft_model(checkpoint_layers=N) checkpoints N layers; a memory plan (fit_checkpoint_layers, the step
    checks' refit) later checkpoints more by their flag alone: those must offload their inputs as well."""
    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    model = FastMoEModel.get_peft_model(model, r=4, checkpoint_layers=checkpoint_layers, offload_checkpoints=True)
    layers = _decoder_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [i < checkpoint_layers for i in range(2)]
    for layer in layers:
        layer.gradient_checkpointing = True  # as checkpoint_plan's _apply does
        assert layer._gradient_checkpointing_func.func is offloaded_checkpoint


def test_enable_refuses_models_it_cannot_switch():
    model, _ = FastMoEModel.from_pretrained(tiny_config("qwen3_moe"), dtype=torch.float32)
    with pytest.raises(ValueError, match="no decoder layer has gradient checkpointing enabled"):
        enable_offloaded_checkpointing(model)
    reentrant = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; 5.17 has the old name only
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)
    with pytest.raises(ValueError, match="use_reentrant=True"):
        enable_offloaded_checkpointing(model)


# --- the function itself --------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """x -> x + dropout(tanh(x W^T * scale)): a parameter, a shared keyword tensor, RNG."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x, *, scale):
        return x + torch.nn.functional.dropout(torch.tanh(self.linear(x) * scale), 0.3)


def _run_blocks(blocks, x, scale, checkpoint_func):
    for block in blocks:
        x = checkpoint_func(functools.partial(block, scale=scale), x)
    return x


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_function_matches_checkpoint(x_requires_grad):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(_Block(8) for _ in range(3))
    x = torch.randn(4, 8, requires_grad=x_requires_grad)
    scale = torch.rand(8, requires_grad=True)  # a keyword tensor with a gradient of its own
    wrt = [*blocks.parameters(), scale, *([x] if x_requires_grad else [])]

    def grads(checkpoint_func):
        torch.manual_seed(1)
        y = _run_blocks(blocks, x, scale, checkpoint_func)
        dy = torch.randn_like(y)
        first = torch.autograd.grad(y, wrt, dy, retain_graph=True)
        return (y, *first, *torch.autograd.grad(y, wrt, dy))  # a second backward over the kept graph

    expected = grads(functools.partial(torch_checkpoint, use_reentrant=False))
    for got, want in zip(grads(offloaded_checkpoint), expected, strict=True):
        assert torch.equal(got, want)
    assert all(t.abs().sum() > 0 for t in expected)


def test_only_positional_tensors_are_offloaded_and_inputs_come_back_one_ahead(monkeypatch):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(_Block(8) for _ in range(3))
    x, scale = torch.randn(4, 8), torch.rand(8)
    stashes, events = [], []
    init, fetch, take = offload._Stash.__init__, offload._Stash.fetch, offload._Stash.take

    def spy_init(self, t):
        init(self, t)
        stashes.append(self)

    def spy_fetch(self):
        if self.fetched is None:
            events.append(("copy", stashes.index(self)))
        fetch(self)

    def spy_take(self):
        x = take(self)
        events.append(("use", stashes.index(self)))  # the block's recompute comes next
        return x

    monkeypatch.setattr(offload._Stash, "__init__", spy_init)
    monkeypatch.setattr(offload._Stash, "fetch", spy_fetch)
    monkeypatch.setattr(offload._Stash, "take", spy_take)
    y = _run_blocks(blocks, x, scale, offloaded_checkpoint)
    assert [tuple(s.host.shape) for s in stashes] == [(4, 8)] * 3  # x per block; never `scale`
    y.sum().backward()
    # The last block's input is copied when needed, each other one before the block after it recomputes.
    assert events == [("copy", 2), ("copy", 1), ("use", 2), ("copy", 0), ("use", 1), ("use", 0)]


def test_inplace_change_of_an_offloaded_input_raises():
    block = _Block(8)
    x = torch.randn(4, 8)
    y = offloaded_checkpoint(functools.partial(block, scale=1.0), x)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_reentrant_is_refused():
    with pytest.raises(ValueError, match="use_reentrant"):
        offloaded_checkpoint(torch.tanh, torch.randn(2), use_reentrant=True)


def test_static_host_buffers_are_made_once_and_reused_by_every_later_step():
    """Inside StaticHostBuffers.active() the layer inputs go to buffers the first step makes and each later step
    takes again (a CUDA graph replays the addresses its capture saw); the gradients stay checkpoint's."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(_Block(8) for _ in range(3))
    scale = torch.rand(8, requires_grad=True)
    wrt = [*blocks.parameters(), scale]
    buffers = offload.StaticHostBuffers()
    stashes = []
    init = offload._Stash.__init__

    def grads(checkpoint_func, x):
        torch.manual_seed(1)
        y = _run_blocks(blocks, x, scale, checkpoint_func)
        return (y, *torch.autograd.grad(y, wrt, torch.ones_like(y)))

    def spy_init(self, t):
        init(self, t)
        stashes.append(self.host.data_ptr())

    used = []
    for _ in range(3):
        x = torch.randn(4, 8)
        expected = grads(functools.partial(torch_checkpoint, use_reentrant=False), x)
        stashes.clear()
        with pytest.MonkeyPatch.context() as patch, buffers.active():
            patch.setattr(offload._Stash, "__init__", spy_init)
            got = grads(offloaded_checkpoint, x)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
        gc.collect()
        used.append(set(stashes))
        assert len(buffers.buffers) == 3 and len(used[-1]) == 3  # one per block, made in the first step only
    assert used[0] == used[1] == used[2] == {b.data_ptr() for b in buffers.buffers}
    assert getattr(offload._thread, "buffers", None) is None  # active() gives the thread its previous state back


def test_static_host_buffers_nest_and_take_only_their_own_shape():
    outer, inner = offload.StaticHostBuffers(), offload.StaticHostBuffers()
    with outer.active():
        with inner.active():
            assert offload._thread.buffers is inner
        assert offload._thread.buffers is outer
    a = outer.take(torch.zeros(2, 3))
    outer.give_back(a, torch.device("cpu"))
    assert outer.take(torch.zeros(2, 3)) is a  # the free one, again
    assert outer.take(torch.zeros(3, 2)) is not a and outer.take(torch.zeros(2, 3, dtype=torch.float16)) is not a
    assert len(outer.buffers) == 3


def test_a_capture_without_a_host_buffer_made_before_it_says_what_to_do(monkeypatch):
    """Pinned memory cannot be allocated while a CUDA graph is recorded: an offloaded input then fails in one line
    naming the fix, outside active() and inside it alike when the eager steps made no buffer of its shape. (The
    capture is stood in for on the CPU.)"""
    block = _Block(8)
    monkeypatch.setattr(offload, "_capturing", lambda x: True)
    with pytest.raises(RuntimeError, match=r"capture the layer inputs need host buffers made before it: .*active\(\)"):
        offloaded_checkpoint(functools.partial(block, scale=1.0), torch.randn(4, 8))
    buffers = offload.StaticHostBuffers()
    with buffers.active(), pytest.raises(RuntimeError, match=r"shape \(4, 8\) came up in a CUDA graph capture"):
        offloaded_checkpoint(functools.partial(block, scale=1.0), torch.randn(4, 8))
    assert buffers.buffers == []


# --- GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_memory_drops_by_the_layer_inputs_and_gradients_stay():
    """8 layers, T = 8192, H = 512 in fp32: each layer input is 16 MiB.

    Between forward and backward the GPU holds one layer input instead of eight: the first stays, a leaf that
    requires grad (transformers' enable_input_require_grads) held by its gradient accumulator. The peak of the
    step drops by nearly as much: from the start of backward the input in use and the prefetched one are back.
    (An input freed while its copy to the host is in flight counts as freed in memory_allocated: the allocator
    only keeps its block from reuse until the copy is done.)
    """
    num_layers, tokens, hidden = 8, 8192, 512
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=tokens, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model, _ = FastMoEModel.from_pretrained(config, dtype=torch.float32, device_map="cuda")
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    randomize_lora_B(model)
    disable_offloaded_checkpointing(model)
    model.train()
    ids, other_ids = (torch.randint(4, VOCAB, (1, tokens), device="cuda") for _ in range(2))
    layer_input = tokens * hidden * 4

    def step(ids):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return held, torch.cuda.max_memory_allocated(), grads

    step(other_ids)  # warm-up: autotuning, compilation, the allocators' first blocks
    held, peak, grads = step(ids)
    assert enable_offloaded_checkpointing(model) == num_layers
    step(other_ids)  # the host buffers reused below hold other data: a copy read too early shows
    offloaded_held, offloaded_peak, offloaded_grads = step(ids)
    for name, grad in grads.items():  # fp32 sums by atomics may come out in another order: not bitwise
        assert relative_error(offloaded_grads[name], grad) < 1e-5, name
    assert abs((held - offloaded_held) / layer_input - (num_layers - 1)) < 0.25
    assert num_layers - 4 <= (peak - offloaded_peak) / layer_input <= num_layers + 0.25


@pytest.mark.gpu
def test_a_captured_step_offloads_its_layer_inputs_and_replays_the_eager_losses():
    """A whole step captured as a CUDA graph with the layer inputs offloaded (StaticHostBuffers around the eager steps
    and the capture): its replays give the losses of a twin training eagerly with offloading, no host buffer is made
    after the first step, and the graph needs about (layers - 1) layer inputs less than the same step captured
    without offloading (record_stream would have kept every input's block taken until the capture's end).

    8 layers, T = 8192, H = 512 in bf16 (in fp32 torch's grouped_mm reads its offsets on the host, which a capture
    refuses): each layer input is 8 MiB."""
    from moetune.training.bf16_adamw import AdamWBf16
    from moetune.training.cuda_graph import capture_step, on_side_stream, without_rng_state

    num_layers, tokens, hidden = 8, 8192, 512
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=tokens, tie_word_embeddings=False,
    )
    ids = torch.randint(4, VOCAB, (1, tokens), device="cuda")
    layer_input = tokens * hidden * 2

    def training(offloaded: bool):
        torch.manual_seed(0)
        model, _ = FastMoEModel.from_pretrained(config, dtype=torch.bfloat16, device_map="cuda")
        model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, offload_checkpoints=offloaded)
        randomize_lora_B(model)
        model.train()
        without_rng_state(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = AdamWBf16(params, lr=torch.tensor(1e-3, device="cuda"), capturable=True)
        return lm_training_step(model, optimizer, ids)

    def graphed(offloaded: bool):
        """(losses of 2 eager steps then 3 replays, the memory the capture and its replays added, host buffers)."""
        step, side, buffers = training(offloaded), torch.cuda.Stream(), offload.StaticHostBuffers()
        with buffers.active():
            losses = [float(on_side_stream(step, side)) for _ in range(2)]
            made = len(buffers.buffers)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            replay = capture_step(step, warmup=0, stream=side)
        losses += [float(replay()) for _ in range(3)]
        torch.cuda.synchronize()
        added = torch.cuda.max_memory_allocated() - before
        assert len(buffers.buffers) == made  # the capture took the eager steps' buffers
        del replay, step
        gc.collect()
        torch.cuda.empty_cache()
        return losses, added, made

    plain_losses, plain_added, _ = graphed(offloaded=False)
    losses, added, made = graphed(offloaded=True)
    twin = training(offloaded=True)
    eager = [float(twin()) for _ in range(5)]
    assert made == num_layers
    assert losses == pytest.approx(eager, rel=2e-3) and plain_losses == pytest.approx(eager, rel=2e-3)
    assert losses[-1] < losses[0]
    assert num_layers - 4 <= (plain_added - added) / layer_input <= num_layers + 0.25, (plain_added, added)


def test_join_unused_fetches_waits_for_each_pending_copy_and_lets_it_go(monkeypatch):
    """Copies back that a captured backward started and never used (the prefetch of an input whose layer autograd did
    not reach) are joined to the capturing stream, once each. (The CUDA stream is stood in for on the CPU.)"""
    waited = []

    class Stream:
        def wait_event(self, event):
            waited.append(event)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    events = [object(), object()]
    monkeypatch.setattr(offload, "_unjoined", {id(e): (e, torch.zeros(2)) for e in events})
    assert offload.join_unused_fetches() == 2
    assert waited == events and offload._unjoined == {}
    assert offload.join_unused_fetches() == 0 and waited == events


@pytest.mark.gpu
def test_a_capture_whose_backward_skips_the_first_layer_input_still_ends_and_replays():
    """torch.autograd.grad over the last block's weight only: the first block's input is prefetched but never used.
    capture_step joins that copy, so the capture ends, and replays give the eager gradient."""
    from moetune.training.cuda_graph import capture_step

    torch.manual_seed(0)
    blocks = [torch.nn.Linear(256, 256).cuda().to(torch.bfloat16) for _ in range(3)]
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    weight = blocks[-1].weight

    def step():
        y = x
        for block in blocks:  # x + tanh(x W^T + b), checkpointed with its input offloaded
            y = offloaded_checkpoint(lambda t, block=block: t + torch.tanh(block(t)), y)
        (grad,) = torch.autograd.grad(y.float().sum(), [weight])
        return grad

    buffers = offload.StaticHostBuffers()
    with buffers.active():
        expected = step()
        replay = capture_step(step, warmup=1)
    assert offload._unjoined == {}
    got = replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-3)  # bf16; the same kernels, likely bitwise
