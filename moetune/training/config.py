"""TrainConfig: every setting of `moetune train`, written once.

The CLI flags (`--max-seq-length`) and the config-file keys (`max_seq_length`, YAML or TOML) are generated
from the fields below, and their help text is the docstring under each field. Precedence: field default <
config file < command-line flag.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import typing
from dataclasses import dataclass

__all__ = ["TrainConfig", "field_docs", "add_arguments", "resolve_config", "load_config_file"]


@dataclass(kw_only=True)
class TrainConfig:
    """A fine-tuning run. The defaults train the built-in demo in well under a minute on 2 CPU cores."""

    model: str | None = None
    """Local checkpoint directory of a supported MoE model (default: the built-in demo, a tiny random-init Qwen3-MoE)."""

    data: str | None = None
    """JSONL training data, one record per line: {"text"} (loss on all tokens), {"messages": [{"role", "content"}]} (rendered with the tokenizer's chat template) or {"instruction", "input", "output"}; chat and instruction records train on the responses only (default: the built-in demo dataset)."""

    output_dir: str = "moetune-output"
    """Where the adapter, checkpoints, metrics.jsonl, plots and summary.json go."""

    max_seq_length: int = 512
    """Longest training sequence in tokens; a longer record is an error (its file and line are named)."""

    max_steps: int | None = None
    """Optimizer steps to run; overrides --epochs when given."""

    epochs: float = 3.0
    """Passes over the data (fractions allowed) when --max-steps is not given."""

    lr: float = 3e-3
    """Peak learning rate (AdamW), reached after warm-up and decayed on a cosine to a tenth of it (transformers' cosine_with_min_lr schedule, as Trainer runs it)."""

    warmup_steps: int = 5
    """Steps of linear learning-rate warm-up (the first at lr 0, as in transformers' Trainer)."""

    weight_decay: float = 0.0
    """AdamW weight decay on the trained parameters, none on biases and norm weights (as transformers' Trainer)."""

    optim: str = "adamw"
    """adamw (torch, fp32 states: 8 bytes per trainable parameter), adamw_bf16 (moetune's AdamW with bf16 states rounded stochastically, 4 bytes: 2.4 GiB less for the 643M LoRA parameters of a whole Qwen3-30B-A3B; one launch per parameter group on CUDA) or adamw_8bit (bitsandbytes' 8-bit states, 2 bytes: 3.6 GiB less; needs pip install bitsandbytes and a CUDA GPU; it steps each tensor on its own, slow with --step-in-backward)."""

    max_grad_norm: float = 1.0
    """Clip the gradients' global norm to this before each optimizer step (0: no clipping). 1.0 is the usual LoRA setting (peft and TRL examples): it keeps the first steps at a high learning rate stable."""

    step_in_backward: bool = False
    """Run the optimizer step inside the backward pass, a chunk of about a layer's parameters at a time, as soon as the chunk's last gradient arrives, then freeing them: no buffer holds every gradient (4 bytes per trainable parameter: 2.4 GiB for a whole Qwen3-30B-A3B, which --checkpoint-layers auto then spends on speed). Same updates; needs --max-grad-norm 0 and --grad-accum 1 (both need every gradient at once)."""

    cuda_graph: bool = False
    """Record the training step once as a CUDA graph and replay it, so that the host issues a step in one call: for hosts too slow to keep the GPU busy (a whole Qwen3-30B-A3B step at 8K: 1.17x on one lent H200, 700 -> 600 ms; 1.00-1.01x on a fast H100 host). Every micro-batch is padded to --batch-size x --max-seq-length (right padding, which the causal mask keeps out of every real token's attention; tokens/s counts real tokens only), the checkpointed layers' inputs go to host memory as in eager steps (into host buffers the eager steps made and the graph reuses), and the first steps run eagerly (compiles, autotuning, the memory plan's checks). Needs a CUDA GPU, no --packing, --dtype bfloat16 or float32, --optim adamw or adamw_bf16."""

    batch_size: int = 8
    """Sequences per micro-batch."""

    grad_accum: int = 1
    """Micro-batches per optimizer step (the loss is averaged over all their response tokens)."""

    r: int = 16
    """LoRA rank (experts and Linear layers alike)."""

    lora_alpha: float = 32.0
    """LoRA alpha; the LoRA update is scaled by lora_alpha / r."""

    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    """Modules that get LoRA: gate_up_proj / down_proj select split LoRA on the experts, other names Linear layers. The default's q/k/v/o stand for the architecture's attention projections (latent attention: q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)."""

    train_router: bool = False
    """Train the router weights in full (saved as peft modules_to_save)."""

    gradient_checkpointing: bool = True
    """Recompute activations in backward: less memory, about a third more compute."""

    checkpoint_layers: int | str | None = "auto"
    """With checkpointing, checkpoint only this many decoder layers (from the first): the others keep their
    activations on the GPU and skip the recompute (faster, more memory). auto: measure one probe step at
    --batch-size x --max-seq-length and keep as many layers out as fit in 90% of the GPU's memory (on CUDA; on a
    CPU every layer is checkpointed). all: every layer."""

    max_memory: float | None = None
    """With --checkpoint-layers auto: plan the step to peak at most this many GiB (torch's allocated memory), e.g.
    for a smaller card than this one or a GPU shared with another job."""

    keep_attention: bool = True
    """With --checkpoint-layers auto: checkpointed layers may keep their attention output where memory allows,
    so their recompute skips the attention kernel (sdpa attention; the plan spends spare memory on this first)."""

    packing: bool = False
    """Pack several records into each sequence of --max-seq-length tokens (attention stays within a record)."""

    seed: int = 0
    """Seed for the LoRA initialisation, the data order and the demo model's random weights."""

    dtype: str = "auto"
    """Compute dtype: auto (bfloat16 on a GPU that has it, else float32), bfloat16, float16 (with dynamic loss scaling, as Trainer's fp16; GPUs without bf16: T4, V100) or float32."""

    device: str = "auto"
    """cpu, cuda or cuda:N (auto: the GPU if there is one)."""

    logging_steps: int = 1
    """Write a metrics.jsonl row (loss, lr, tokens/s, memory, expert load) every this many steps."""

    save_steps: int = 20
    """Write a checkpoint every this many steps (and at the end)."""

    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk."""

    resume: bool = False
    """Continue the run in --output-dir from its newest checkpoint."""

    overwrite: bool = False
    """Replace a run already in --output-dir instead of refusing to start."""


DTYPES = ("auto", "bfloat16", "float16", "float32")
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_8bit")
POSITIVE_INTS = ("max_seq_length", "batch_size", "grad_accum", "r", "logging_steps", "save_steps", "keep_checkpoints")


@functools.cache
def field_docs(cls=TrainConfig) -> dict[str, str]:
    """{field name: the docstring written under it} read from the class source (Python keeps no field docs)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    missing = {f.name for f in dataclasses.fields(cls)} - set(docs)
    assert not missing, f"TrainConfig fields without a docstring: {missing}"
    return docs


def flag(name: str) -> str:
    """The command-line flag that sets TrainConfig's field `name`."""
    return "--" + name.replace("_", "-")


def _base_type(annotation):
    """int for `int | None`, str for `tuple[str, ...]`: the type one value on the command line converts to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return args[0]
    if args:
        return args[0]
    return annotation


def _types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are left unset so that a config file can fill them."""
    docs = field_docs()
    for field in dataclasses.fields(TrainConfig):
        annotation = _types()[field.name]
        default = field.default
        shown = " ".join(default) if isinstance(default, tuple) else default
        help_text = docs[field.name] if default is None else f"{docs[field.name]} (default: {shown})"
        help_text = help_text.replace("%", "%%")
        kwargs = dict(default=argparse.SUPPRESS, help=help_text, dest=field.name)
        if annotation is bool:
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(annotation) is tuple:
            parser.add_argument(flag(field.name), nargs="+", metavar="NAME", **kwargs)
        elif field.name == "checkpoint_layers":
            parser.add_argument(flag(field.name), type=layers_or_auto, metavar="{N,auto,all}", **kwargs)
        else:
            choices = {"dtype": DTYPES, "optim": OPTIMIZERS}.get(field.name)
            parser.add_argument(flag(field.name), type=_base_type(annotation), choices=choices, **kwargs)


def layers_or_auto(value: str) -> int | str | None:
    """--checkpoint-layers: an integer, "auto", or "all" (every layer: None)."""
    if value in ("auto", "all"):
        return None if value == "all" else value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, auto or all, got {value!r}") from None


def load_config_file(path: str) -> dict:
    """Keys and values of a YAML (.yaml/.yml) or TOML (.toml) file, keys normalised to field names."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".toml"):
        raise ValueError(f"--config: expected a .yaml, .yml or .toml file, got {path!r}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ValueError(f"--config: cannot read {path}: {err.strerror}") from None
    try:
        if ext == ".toml":
            import tomllib

            values = tomllib.loads(raw.decode("utf-8"))
        else:
            import yaml

            values = yaml.safe_load(raw) or {}
    except Exception as err:  # yaml and tomllib raise their own error classes; both mean a malformed file
        detail = " ".join(str(err).split())
        raise ValueError(f"--config: {path} is not valid {ext[1:].upper()}: {detail}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path} must hold a mapping of settings, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    normalised = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"--config: unknown key {key!r} in {path}; expected one of {', '.join(sorted(known))}")
        normalised[name] = value
    return normalised


def _coerce(name: str, value):
    """A config-file value checked (and converted where lossless) to the field's type."""
    annotation = _types()[name]
    base = _base_type(annotation)
    if value is None and type(None) in typing.get_args(annotation):
        return None
    if name == "checkpoint_layers" and isinstance(value, str):
        try:
            return layers_or_auto(value.strip())
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"{name}: {err}") from None
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name}: expected a list of names, got {value!r}")
        return tuple(value)
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, str):  # PyYAML reads YAML 1.1, where 2e-4 is a string (only 2.0e-4 is a float)
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {value!r}")
    return value


def validate(config: TrainConfig) -> TrainConfig:
    """Range checks; a bad value raises ValueError naming the flag."""
    for name in POSITIVE_INTS:
        if getattr(config, name) < 1:
            raise ValueError(f"{flag(name)}: expected an integer >= 1, got {getattr(config, name)}")
    layers = config.checkpoint_layers
    if layers is not None and layers != "auto" and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
        raise ValueError(f"--checkpoint-layers: expected an integer >= 0 or auto, got {layers!r}")
    if config.max_memory is not None and not 0 < config.max_memory < float("inf"):
        raise ValueError(f"--max-memory: expected a number of GiB > 0, got {config.max_memory}")
    # Settings of the automatic plan; without that plan they would be silently ignored.
    planned = layers == "auto" and config.gradient_checkpointing
    given = ("--no-gradient-checkpointing" if not config.gradient_checkpointing
             else f"--checkpoint-layers {'all' if layers is None else layers}")
    if layers != "auto" and not config.gradient_checkpointing:
        raise ValueError(f"--checkpoint-layers: applies with gradient checkpointing on, got "
                         f"--checkpoint-layers {'all' if layers is None else layers} with --no-gradient-checkpointing")
    for name in ("data", "output_dir"):  # an empty value (an unset shell variable) is not the default
        if getattr(config, name) == "":
            raise ValueError(f"{flag(name)}: expected a path, got ''")
    for option, asked in (("--max-memory", config.max_memory is not None), ("--no-keep-attention", not config.keep_attention)):
        if asked and not planned:
            raise ValueError(f"{option}: applies to --checkpoint-layers auto with gradient checkpointing on, got {given}")
    if not 0 <= config.max_grad_norm < float("inf"):
        raise ValueError(f"--max-grad-norm: expected a number >= 0 (0: no clipping), got {config.max_grad_norm}")
    if config.step_in_backward and (config.max_grad_norm > 0 or config.grad_accum > 1):
        raise ValueError(
            "--step-in-backward: needs --max-grad-norm 0 and --grad-accum 1 (clipping and accumulation need every "
            f"gradient at once), got --max-grad-norm {config.max_grad_norm} --grad-accum {config.grad_accum}")
    if config.step_in_backward and config.dtype == "float16":
        raise ValueError("--step-in-backward: not with --dtype float16, whose loss scaling checks every gradient "
                         "before the step (use bfloat16 or float32)")
    if config.cuda_graph:
        refused = ("--packing" if config.packing else "--dtype float16" if config.dtype == "float16"
                   else "--optim adamw_8bit" if config.optim == "adamw_8bit" else None)
        why = {"--packing": "packed rows' example boundaries change from batch to batch",
               "--dtype float16": "its loss scaling reads the scale on the host every step",
               "--optim adamw_8bit": "bitsandbytes' step counts live on the host"}
        if refused:
            raise ValueError(f"--cuda-graph: not with {refused} ({why[refused]}); or leave out --cuda-graph")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"--max-steps: expected an integer >= 1, got {config.max_steps}")
    inf = float("inf")
    for name in ("epochs", "lr", "lora_alpha"):  # finite: inf and nan pass a plain > 0 or fail only mid-run
        if not 0 < getattr(config, name) < inf:
            raise ValueError(f"{flag(name)}: expected a finite number > 0, got {getattr(config, name)}")
    if config.warmup_steps < 0:
        raise ValueError(f"--warmup-steps: expected an integer >= 0, got {config.warmup_steps}")
    if not 0 <= config.weight_decay < inf:
        raise ValueError(f"--weight-decay: expected a finite number >= 0, got {config.weight_decay}")
    if not -(2**63) <= config.seed < 2**63:  # torch's generators take 64 bits
        raise ValueError(f"--seed: expected an integer in [-2**63, 2**63), got {config.seed}")
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.optim not in OPTIMIZERS:
        raise ValueError(f"--optim: expected one of {', '.join(OPTIMIZERS)}, got {config.optim!r}")
    if not config.target_modules:
        raise ValueError("--target-modules: expected at least one module name")
    if config.resume and config.overwrite:
        raise ValueError("--resume and --overwrite: pick one (continue the run, or replace it)")
    return config


def resolve_config(flags: dict, config_file: str | None = None) -> TrainConfig:
    """TrainConfig from defaults, then (with --resume) the settings of the checkpoint it continues, then the config
    file, then the flags given on the command line."""
    if config_file is not None and not str(config_file).strip():  # an unset shell variable, most likely
        raise ValueError(f"--config: expected a path to a .yaml, .yml or .toml file, got {config_file!r}")
    values = load_config_file(config_file) if config_file else {}
    try:
        values = {name: _coerce(name, value) for name, value in values.items()}
    except ValueError as err:
        raise ValueError(f"--config: {config_file}: {err}") from None
    values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in flags.items()})
    if values.get("resume"):
        from .checkpoint import saved_settings

        known = {f.name for f in dataclasses.fields(TrainConfig)}
        output_dir = values.get("output_dir", TrainConfig.output_dir)
        saved = {name: _coerce(name, value) for name, value in saved_settings(output_dir).items() if name in known}
        if values.get("data") is None and saved.get("data") is not None and not os.path.exists(saved["data"]):
            raise ValueError(f"--resume: the run was trained on --data {saved['data']}, which is gone (a pipe lives "
                             "one process); pass --data with the same records")
        values = {**saved, **values}
    return validate(TrainConfig(**values))
