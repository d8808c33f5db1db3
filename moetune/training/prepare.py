"""Everything a run checks before it writes anything: device, backend, model, tokenizer, data, output dir.

A user error anywhere here raises ValueError with one line naming the flag (and file and line for data),
so a bad run stops before the output directory holds anything that looks like a run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources

import torch

from ..devices import check_gpu_index
from ..experts import select_backend
from ..messages import config_load_errors, first_line, whole_message
from . import data as data_mod
from .checkpoint import latest_checkpoint
from .config import TrainConfig

__all__ = ["Plan", "prepare", "DEMO_DIR", "RUN_FILES"]

DEMO_DIR = str(resources.files("moetune") / "demo")
# What a run writes into --output-dir; --overwrite removes exactly these and nothing else.
RUN_FILES = ("adapter", "checkpoints", "metrics.jsonl", "loss.png", "expert_load.png", "summary.json", "demo-model")


@dataclass
class Plan:
    config: TrainConfig
    device: torch.device
    dtype: torch.dtype
    backend: str
    backend_why: str
    model_dir: str | None  # None: the demo model, built from DEMO_DIR/config.json with the seed
    model_config: object
    tokenizer: object
    data_path: str
    data_format: str
    examples: list
    resume_from: str | None
    data_note: str | None = None  # a warning about the data the run should print (the chat template's stop token)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} asked for, but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    check_gpu_index(device, "--device")
    return device


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPU matmuls in bf16 are slower than fp32 on most CPUs, and the demo is small enough for fp32.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def _check_optimizer(name: str, device: torch.device, dtype: torch.dtype, train_router: bool) -> None:
    if name == "adamw_bf16" and train_router and dtype != torch.float32:
        # (checked before anything is written: the optimizer is built after the model's files)
        raise ValueError(f"--optim: adamw_bf16 steps float32 weights, and --train-router trains the routers in the "
                         f"model's {str(dtype).removeprefix('torch.')}; use --optim adamw, or --dtype float32")
    if name != "adamw_8bit":
        return
    if device.type != "cuda":
        raise ValueError(f"--optim: adamw_8bit runs on a CUDA GPU (bitsandbytes), but the device is {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--optim: adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from None


def _model_config(model_dir: str):
    import transformers

    from ..models.registry import SUPPORTED_MODEL_TYPES

    if not os.path.isdir(model_dir):
        raise ValueError(f"--model: no such directory: {model_dir}")
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--model: {model_dir} has no config.json (expected a transformers checkpoint directory)")
    try:
        with open(config_path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--model: cannot read {config_path}: {err}") from None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"--model: {model_dir} is a {model_type!r} model, not a supported MoE architecture; "
            f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        return transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except config_load_errors() as err:
        raise ValueError(f"--model: cannot load the config in {model_dir}: {whole_message(err)}") from None


def _tokenizer(model_dir: str, max_seq_length: int):
    import transformers

    from ..fast_model import TOKENIZER_FILES

    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"--model: {model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            model_dir, local_files_only=True, model_max_length=max_seq_length
        )
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception for a corrupt tokenizer.json
        raise ValueError(f"--model: cannot load the tokenizer in {model_dir}: {first_line(err)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"--model: the tokenizer in {model_dir} is not a fast tokenizer (tokenizer.json needed)")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError(f"--model: the tokenizer in {model_dir} has neither a pad nor an eos token")
    return tokenizer


def _language_setting(model_config, name: str) -> int | None:
    """A setting of the language model's config (the text config of a vision-language model)."""
    from ..models.registry import get_spec

    return getattr(get_spec(model_config.model_type).language_config(model_config), name, None)


def _check_routing(model_config, model_dir: str) -> None:
    """Each token's top-k must be a choice among the model's experts (else the first forward fails in torch.topk,
    mid-run, with "selected index k out of range")."""
    top_k = _language_setting(model_config, "num_experts_per_tok")
    experts = next((n for n in (_language_setting(model_config, name) for name in
                                ("num_local_experts", "num_experts", "n_routed_experts")) if n is not None), None)
    if top_k is None or experts is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        raise ValueError(f"--model: {model_dir}'s config sets num_experts_per_tok {top_k!r}; expected an integer from "
                         f"1 to its {experts} experts")


def _check_token_ids(examples, tokenizer, model_config, source: str) -> None:
    """Every token id the data and the padding use must be a row of the model's embedding (an id past it fails
    mid-step: an IndexError on CPU, a device-side assert on CUDA)."""
    vocab = _language_setting(model_config, "vocab_size")
    if vocab is None:
        return
    largest = max(max(e.input_ids, default=0) for e in examples)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for what, token in (("the data tokenise to id", largest), ("the padding token is id", pad)):
        if token is not None and token >= vocab:
            raise ValueError(f"--model: with the tokenizer in {source} {what} {token}, past the model's vocabulary "
                             f"of {vocab} ids (tokenizer and model do not match)")


def _check_output_dir(config: TrainConfig) -> str | None:
    """The checkpoint to resume from (None: a fresh run); refuses to mix a new run into an old one."""
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir: {out} exists and is not a directory")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):  # the run creates the missing part: the nearest that exists must allow it
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not os.path.isdir(existing) else "is not writable"
        raise ValueError(f"--output-dir: cannot write {out}: {existing} {what}")
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if config.resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise ValueError(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')}")
        return checkpoint
    if present and not config.overwrite:
        resume = ("pass --resume to continue it, --overwrite to replace it" if latest_checkpoint(out) is not None
                  else "it has no checkpoint to --resume from; pass --overwrite to replace it")
        raise ValueError(f"--output-dir: {out} already holds a run ({', '.join(present)}); {resume}, or another "
                         "--output-dir")
    return None


def prepare(config: TrainConfig) -> Plan:
    device = _device(config.device)
    dtype = _dtype(config.dtype, device)
    backend, why = select_backend(device, dtype, explain=True)  # a bad MOETUNE_MOE_BACKEND fails here
    _check_optimizer(config.optim, device, dtype, config.train_router)
    if config.model is None:
        model_dir, source = None, DEMO_DIR
        model_config = _model_config(DEMO_DIR)
    else:
        model_dir = source = config.model
        model_config = _model_config(model_dir)
    if config.cuda_graph and _language_setting(model_config, "output_router_logits"):
        raise ValueError("--cuda-graph: not with a model whose config sets output_router_logits (its router aux loss "
                         "needs the padding mask, which the graph's batches do not have); or leave out --cuda-graph")
    if config.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph: records the step on a CUDA GPU, but the device is {device}")
    _check_routing(model_config, model_dir or "the demo model")
    limit = _language_setting(model_config, "max_position_embeddings")
    if limit is not None and config.max_seq_length > limit:
        raise ValueError(f"--max-seq-length: {config.max_seq_length} is longer than the model allows ({limit} positions)")
    layers = _language_setting(model_config, "num_hidden_layers")
    if isinstance(config.checkpoint_layers, int) and layers is not None and config.checkpoint_layers > layers:
        raise ValueError(
            f"--checkpoint-layers: expected at most the model's {layers} decoder layers, got {config.checkpoint_layers}"
        )
    tokenizer = _tokenizer(source, config.max_seq_length)
    data_path = config.data or os.path.join(DEMO_DIR, "data.jsonl")
    data_format, examples = data_mod.load_examples(data_path, tokenizer, config.max_seq_length)
    _check_token_ids(examples, tokenizer, model_config, source)
    resume_from = _check_output_dir(config)
    return Plan(
        config=config, device=device, dtype=dtype, backend=backend, backend_why=why, model_dir=model_dir,
        model_config=model_config, tokenizer=tokenizer, data_path=data_path, data_format=data_format,
        examples=examples, resume_from=resume_from,
        data_note=data_mod.stop_token_note(tokenizer) if data_format != "text" else None,
    )
