"""moetune.training.cuda_graph: a training step recorded once as a CUDA graph and replayed (the capture on a GPU; on a
CPU the mask patches and the checks a capture needs)."""

from __future__ import annotations

import functools

import pytest
import torch

from moetune.training.cuda_graph import capture_step, eager_masks, on_side_stream, without_rng_state

from ..models.helpers import checkpoint, randomize_lora_B, token_batch  # noqa: F401  (checkpoint: a fixture)
from .helpers import lm_training_step


def _attention_masks(model, ids) -> list:
    """The attn_mask each scaled_dot_product_attention call of a forward gets."""
    masks = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return real(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)  # as in training: no cache, so transformers checks for packing
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    return masks


def test_eager_masks_give_a_captured_forward_the_eager_attention(checkpoint, monkeypatch):  # noqa: F811
    """transformers takes a CUDA stream capture for tracing and then builds an explicit causal mask (no flash
    path): under eager_masks a forward during capture calls attention as the eager one does, without a mask."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("qwen3_moe"), attn_implementation="sdpa")
    ids = token_batch(1, 16)
    assert _attention_masks(model, ids) == [None] * model.config.num_hidden_layers  # eager: the causal shortcut
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = _attention_masks(model, ids)
    assert isinstance(captured[0], torch.Tensor)  # what a capture would record without the patches
    with eager_masks():
        assert _attention_masks(model, ids) == [None] * model.config.num_hidden_layers
    assert isinstance(_attention_masks(model, ids)[0], torch.Tensor)  # restored after


def test_without_rng_state_turns_off_the_checkpoints_rng_state_and_refuses_dropout(checkpoint):  # noqa: F811
    from moetune import FastMoEModel

    model, _ = FastMoEModel.from_pretrained(checkpoint("qwen3_moe"), dtype=torch.float32)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    funcs = [m.__dict__["_gradient_checkpointing_func"] for m in model.modules()
             if isinstance(m.__dict__.get("_gradient_checkpointing_func"), functools.partial)]
    assert funcs and all(f.keywords.get("preserve_rng_state", True) for f in funcs)
    without_rng_state(model)
    funcs = [m.__dict__["_gradient_checkpointing_func"] for m in model.modules()
             if isinstance(m.__dict__.get("_gradient_checkpointing_func"), functools.partial)]
    assert funcs and all(f.keywords["preserve_rng_state"] is False for f in funcs)
    for dropout in (torch.nn.Dropout(0.1), torch.nn.Dropout1d(0.1), torch.nn.AlphaDropout(0.1)):
        with pytest.raises(ValueError, match="model: a CUDA graph step needs no dropout"):
            without_rng_state(torch.nn.Sequential(torch.nn.Linear(2, 2), dropout))
    attention = next(m for m in model.modules() if hasattr(m, "attention_dropout"))
    attention.attention_dropout = 0.1  # what config.attention_dropout > 0 gives transformers' attention modules
    with pytest.raises(ValueError, match="got .* with 0.1"):
        without_rng_state(model)


def test_capture_step_needs_a_gpu_a_whole_warmup_and_a_stream():
    with pytest.raises(ValueError, match="warmup: expected an integer >= 0"):
        capture_step(lambda: torch.zeros(()), warmup=-1)
    with pytest.raises(ValueError, match="stream: expected a torch.cuda.Stream or None, got str"):
        capture_step(lambda: torch.zeros(()), stream="side")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="capture_step: CUDA graphs need a CUDA GPU"):
            capture_step(lambda: torch.zeros(()))


def test_eager_masks_leave_a_padded_batch_to_transformers_without_a_host_read(checkpoint, monkeypatch):  # noqa: F811
    """With an attention mask (padded rows), a captured forward must not read it on the host to decide whether to
    skip it (transformers' own answer under a capture: it builds the mask); faked capture, a host read raises."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint("qwen3_moe"), attn_implementation="sdpa")
    ids = token_batch(1, 16)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    def host_read(self):
        raise AssertionError("a host read of a tensor inside the (faked) capture")

    with eager_masks(), torch.no_grad():
        monkeypatch.setattr(torch.Tensor, "__bool__", host_read)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _tiny_training(model_dir: str, step_in_backward: bool, lr: float):
    """A tiny bf16 Qwen3-MoE with LoRA through FastMoEModel (checkpointed, nothing offloaded), its capturable bf16
    AdamW (stepped in backward or after it) and a step over one fixed batch."""
    from moetune import FastMoEModel
    from moetune.training.bf16_adamw import AdamWBf16
    from moetune.training.step_in_backward import StepInBackward

    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=True,
                                        offload_checkpoints=False)
    randomize_lora_B(model)
    model.train()
    without_rng_state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    rate = torch.tensor(lr, device="cuda")
    kwargs = dict(lr=rate, weight_decay=0.01, capturable=True)
    optimizer = StepInBackward(params, AdamWBf16, **kwargs) if step_in_backward else AdamWBf16(params, **kwargs)
    step = lm_training_step(model, optimizer, token_batch(1, 64).cuda())
    step.optimizer = optimizer
    return step, params, rate


@pytest.mark.gpu
@pytest.mark.parametrize("step_in_backward", [False, True], ids=["after-backward", "in-backward"])
def test_replays_train_as_the_eager_steps(checkpoint, step_in_backward):  # noqa: F811
    """One eager step, three warm-up steps, then four more, eagerly in one model and replayed from a graph in its
    twin, with the learning rate changed in place before the last two: the same losses, and LoRA weights no farther
    from the eager ones than a second eager run's are (a replay that repeated its captured step count, bias
    corrections or learning rate would be off in every weight, by a good part of a step).

    The weights are compared in norm, not by their largest difference: AdamW moves every weight about lr a step
    (lr times the sign of m / sqrt(v) where the gradient keeps its sign), and where a gradient is near zero that sign
    can follow run-to-run noise (atomics, cuDNN's backward), so a few weights may end a step or two apart between
    runs (H100, run 84b: the largest difference 0.024 of the 0.066 moved, the losses within 2e-3)."""
    model_dir = checkpoint("qwen3_moe")
    eager_step, eager_params, eager_lr = _tiny_training(model_dir, step_in_backward, 1e-2)
    again_step, again_params, again_lr = _tiny_training(model_dir, step_in_backward, 1e-2)
    graph_step, graph_params, graph_lr = _tiny_training(model_dir, step_in_backward, 1e-2)
    start = [p.detach().clone() for p in eager_params]
    eager_losses = [float(eager_step()) for _ in range(4)]
    for _ in range(4):
        again_step()
    first = float(graph_step())
    replay = capture_step(graph_step, warmup=3)
    graph_losses = []
    for i in range(4):
        if i == 2:
            for rate in (eager_lr, again_lr, graph_lr):
                rate.fill_(3e-3)
        eager_losses.append(float(eager_step()))
        again_step()
        graph_losses.append(float(replay()))
    assert first == pytest.approx(eager_losses[0], rel=1e-3)
    for optimizer in (eager_step.optimizer, graph_step.optimizer):  # 1 + 3 warm-up + 4: counted on the device
        assert {float(s["step"]) for s in optimizer.state_dict()["state"].values()} == {8.0}
    assert graph_losses == pytest.approx(eager_losses[4:], rel=2e-3)
    assert graph_losses[-1] < eager_losses[0]  # the replays train

    def distance(these, those) -> float:
        return float(torch.linalg.vector_norm(torch.cat([(p.float() - q.float()).flatten() for p, q in zip(these, those)])))

    moved, noise, apart = (distance(eager_params, other) for other in (start, again_params, graph_params))
    assert moved > 1e-3 and apart < 2 * noise + 0.02 * moved, (moved, noise, apart)


@pytest.mark.gpu
def test_a_capture_on_the_eager_steps_stream_adds_nothing_to_their_peak(checkpoint):  # noqa: F811
    """Captured on the stream its eager steps ran on, the step's graph allocates no more than those steps' peak
    (its pool takes the working memory they freed): cuBLAS's per-thread, per-stream workspaces exist already. A memory
    plan checks the eager steps, so a replay then stays within the plan (run 84b, before: a capture on a stream of
    its own peaked 118 MB above the checked eager step, over --max-memory)."""
    step, _, _ = _tiny_training(checkpoint("qwen3_moe"), step_in_backward=False, lr=1e-3)
    side = torch.cuda.Stream()
    for _ in range(2):
        on_side_stream(step, side)
    torch.cuda.synchronize()
    eager_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    replay = capture_step(step, warmup=0, stream=side)
    replay()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() <= eager_peak + 2**20, (torch.cuda.max_memory_allocated(), eager_peak)
