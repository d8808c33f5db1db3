"""Shared pieces of the model tests: tiny checkpoints on disk, a tiny tokenizer, the eager+PEFT reference."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

from moetune.experts.backends import triton as triton_backend
from moetune.models import SUPPORTED_MODEL_TYPES, get_spec

from .tiny import VOCAB, tiny_config

SENTENCES = [
    "the router picks two experts for every token",
    "low rank adapters train a few million parameters",
    "mixture of experts models are sparse and wide",
    "split lora never forms the full delta weight",
]


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer trained on SENTENCES (ids < VOCAB), nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials, vocab_size=VOCAB))
    assert tok.get_vocab_size() <= VOCAB
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def auto_class(model_type: str):
    return getattr(transformers, get_spec(model_type).auto_class)


def save_checkpoint(model_type: str, directory: str, *, tokenizer: bool = True, seed: int = 0, **config) -> str:
    """Random-init tiny model saved with save_pretrained (fp32), plus a tokenizer; `config` overrides the tiny
    config's attributes."""
    torch.manual_seed(seed)
    tiny = tiny_config(model_type)
    tiny.update(config)
    model = auto_class(model_type).from_config(tiny, dtype=torch.float32)
    with torch.no_grad():  # routers start at zero in some models (gpt-oss): random routing exercises more experts
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias")):
                p.normal_(0, 0.5)
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    model.save_pretrained(directory)
    if tokenizer:
        tiny_tokenizer().save_pretrained(directory)
    return directory


def plain_peft_model(model_dir: str, adapter_dir: str):
    """The reference: plain transformers (eager experts, eager attention) + peft's own adapter loading."""
    from peft import PeftModel

    base = auto_class(_model_type(model_dir)).from_pretrained(
        model_dir, dtype=torch.float32, experts_implementation="eager", attn_implementation="eager",
        local_files_only=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)


def _model_type(model_dir: str) -> str:
    return transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type


def randomize_lora_B(model, std: float = 0.05, seed: int = 1) -> None:
    """B starts at zero (PEFT's init); make it non-zero so the LoRA path changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# Relative error against float64 computed from the same rounded inputs, by dtype (the LoRA Linear paths).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def token_batch(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, length), generator=gen)


# One parametrized test over the whole registry: a new architecture is tested by adding its tiny config.
ALL_ARCHS = pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)

_CHECKPOINTS: dict[str, str] = {}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """model_type -> directory of a saved tiny checkpoint with a tokenizer (each built once per session)."""

    def get(model_type: str) -> str:
        if model_type not in _CHECKPOINTS:
            _CHECKPOINTS[model_type] = save_checkpoint(model_type, str(tmp_path_factory.mktemp(model_type)))
        return _CHECKPOINTS[model_type]

    return get


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tests of moetune's Triton kernels inside models: on a GPU, or on CPU in Triton's interpreter.
needs_triton = pytest.mark.skipif(
    triton_backend.probe(DEVICE, 0 if DEVICE == "cuda" else None, torch.float32) is not None,
    reason="no Triton that can run here",
)


def spy_only_for_backward(monkeypatch) -> list[bool]:
    """Records each moe_experts call's only_for_backward flag (True: a checkpoint's recompute, skipping)."""
    from moetune.experts import api
    from moetune.models import hook

    calls = []
    real = api.moe_experts

    def spy(*args, **kwargs):
        calls.append(kwargs.get("only_for_backward", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(hook, "moe_experts", spy)
    return calls


def logits_and_input_grad(model, ids):
    """The logits and the gradient of a fixed weighting of them with respect to the input embeddings."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    weights = torch.linspace(-1, 1, logits.numel(), device=logits.device).reshape(logits.shape)
    (grad,) = torch.autograd.grad((logits * weights).sum(), embeds)
    return logits.detach(), grad


def lora_model(model_dir: str, **kwargs):
    """A tiny checkpoint through FastMoEModel with LoRA r=4 (B randomised so the adapters change the output)."""
    from moetune import FastMoEModel

    model, _ = FastMoEModel.from_pretrained(model_dir, dtype=torch.float32)
    model = FastMoEModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, **kwargs)
    randomize_lora_B(model)
    return model


def logits_and_lora_grads(model, ids):
    """(logits, {name: gradient of the loss}) for every trainable parameter."""
    out = model(input_ids=ids, labels=ids)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, [dict(model.named_parameters())[n] for n in names])
    return out.logits, dict(zip(names, grads))


def stand_in_varlen(query, key, value, cu_seq, max_len, scale, window):
    """packed_attention.kernel's contract, for CPU (torch's varlen kernel is CUDA only): causal attention within
    each segment of the rows laid end to end (packed_attention.reference_kernel), its longest segment checked."""
    from moetune.models.packed_attention import reference_kernel

    offsets = cu_seq.tolist()
    assert max_len == max(b - a for a, b in zip(offsets[:-1], offsets[1:]))
    return reference_kernel(query, key, value, cu_seq, max_len, scale, window)


def _op_arguments(op, args, kwargs) -> dict:
    return {**dict(zip((a.name for a in op._schema.arguments), args)), **kwargs}


@pytest.fixture(scope="session")
def varlen_op_on_cpu():
    """torch's own varlen attention op (torch_attn::_varlen_attn and its backward) given CPU kernels: stand_in_varlen
    forward, its gradients through autograd. What runs is then this torch's varlen_attn, its signature, its
    autograd and its op (as kept_attention sees it on a GPU); only the kernels are the tests'. Registered for the
    session (torch has no way to take a kernel back); the op runs nowhere else on CPU."""
    try:
        from torch.nn.attention import varlen

        forward_op = torch.ops.torch_attn._varlen_attn.default
        backward_op = torch.ops.torch_attn._varlen_attn_backward.default
        custom_forward, custom_backward = varlen._varlen_attn, varlen._varlen_attn_backward
    except (ImportError, AttributeError):
        pytest.skip("this torch has no varlen attention op")

    def reference(a, query, key, value):
        left = (a.get("window_size") or [-1, -1])[0]
        scale = a.get("scale") or query.shape[-1] ** -0.5
        return stand_in_varlen(query, key, value, a["cu_seq_q"], a["max_q"], scale, None if left < 0 else left + 1)

    def forward(*args, **kwargs):
        a = _op_arguments(forward_op, args, kwargs)
        query = a["query"]
        out = reference(a, query, a["key"], a["value"])
        return out, query.new_zeros(query.shape[1], query.shape[0]), torch.zeros(2, dtype=torch.uint64)

    def backward(*args, **kwargs):  # (autograd is off inside a kernel: the softmax's gradient written out)
        a = _op_arguments(backward_op, args, kwargs)
        query, key, value, grad_out = a["query"], a["key"], a["value"], a["grad_out"]
        repeat = query.shape[1] // key.shape[1]
        keys, values = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        left = (a.get("window_size") or [-1, -1])[0]
        scale = a.get("scale") or query.shape[-1] ** -0.5
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(keys), torch.zeros_like(values)
        offsets = a["cu_seq_q"].tolist()
        for start, end in zip(offsets[:-1], offsets[1:]):
            q, k, v, g = (t[start:end].transpose(0, 1) for t in (query, keys, values, grad_out))  # [H, n, D]
            i = torch.arange(end - start)
            allowed = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] <= left) if left >= 0 else True)
            p = (q @ k.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
            dp = g @ v.transpose(1, 2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
            dq[start:end] = (ds @ k).transpose(0, 1)
            dk[start:end] = (ds.transpose(1, 2) @ q).transpose(0, 1)
            dv[start:end] = (p.transpose(1, 2) @ g).transpose(0, 1)
        grouped = (key.shape[0], key.shape[1], repeat, -1)  # the query heads of each key/value head summed
        return dq, dk.view(grouped).sum(2), dv.view(grouped).sum(2)

    custom_forward.register_kernel("cpu")(forward)
    custom_backward.register_kernel("cpu")(backward)
    return forward_op
