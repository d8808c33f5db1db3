"""PEFT-format adapters for models with moetune expert LoRA, and merging an adapter into a checkpoint.

The only place that knows PEFT's `target_parameters` layout (pinned by tests/test_adapters.py against
peft itself). For one experts module with E experts and rank R:

    moetune (internal)                PEFT (on disk)
    A [E, R, in]                      lora_A.weight [R*E, in]    expert-major: row e*R + j    = A[e, j, :]
    B [E, out, R]                     lora_B.weight [out, R*E]   rank-major:   column j*E + e = B[e, :, j]

`in`/`out` are the projection's own (gate_up: H -> 2I, down: I -> H) whatever the storage layout:
PEFT reads gpt-oss's transposed [E, H, 2I] through the module's `is_transposed`. PEFT wraps one
ParamWrapper per target parameter in the order the experts module registers them (gate_up_proj
first in every supported model), innermost first, so with both targets the gate_up factors sit one
`base_layer.` deeper than the down factors.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .messages import config_load_errors, first_line, whole_message
from .models.hook import DEFAULT_ADAPTER, LORA_PARAMS, expert_lora
from .models.quantized import from_pretrained_dequantized

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "expert_factors_to_peft",
    "expert_factors_from_peft",
    "expert_peft_keys",
    "save_adapter",
    "load_adapter_weights",
    "merge",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Registration order of the parameters in transformers' experts modules: it fixes PEFT's nesting.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@contextlib.contextmanager
def peft_deprecation_quiet():
    """peft 0.21 reads `is_gradient_checkpointing`, deprecated in transformers >= 5.2x: not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def expert_factors_to_peft(A_ERin: torch.Tensor, B_EoutR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """moetune A [E, R, in], B [E, out, R] -> PEFT lora_A.weight [R*E, in], lora_B.weight [out, R*E]."""
    num_experts, rank, fan_in = A_ERin.shape
    A = A_ERin.reshape(num_experts * rank, fan_in)
    B = B_EoutR.permute(1, 2, 0).reshape(B_EoutR.shape[1], rank * num_experts)
    return A.contiguous(), B.contiguous()


def expert_factors_from_peft(A: torch.Tensor, B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT lora_A.weight [R*E, in], lora_B.weight [out, R*E] -> moetune A [E, R, in], B [E, out, R] (fresh copies)."""
    if A.shape[0] % num_experts:
        raise ValueError(f"A: expected {num_experts} experts times the rank rows, got shape {list(A.shape)}")
    rank = A.shape[0] // num_experts
    A_ERin = A.reshape(num_experts, rank, A.shape[1])
    B_EoutR = B.reshape(B.shape[0], rank, num_experts).permute(2, 0, 1)
    return A_ERin.clone(memory_format=torch.contiguous_format), B_EoutR.clone(memory_format=torch.contiguous_format)


def expert_peft_keys(module_key: str, targets: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """{parameter: (lora_A key, lora_B key)} of one experts module in PEFT's saved state dict."""
    keys = {}
    for i, param in enumerate(targets):
        prefix = module_key + ".base_layer" * (len(targets) - 1 - i)
        keys[param] = (f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight")
    return keys


def _is_expert_factor(key: str) -> bool:
    """Whether a state-dict key is one of moetune's expert LoRA factors (`...experts.lora_A_gate_up.<adapter>.weight`),
    which this module converts itself, as opposed to peft's own LoRA (`...q_proj.lora_A.<adapter>.weight`)."""
    return any(f".{name}." in key for name in LORA_PARAMS)


def _expert_modules(peft_model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in peft_model.named_modules() if expert_lora(m) is not None}


def _targets(module: nn.Module) -> tuple[str, ...]:
    lora = expert_lora(module)
    return tuple(p for p, present in zip(EXPERT_PARAMS, (lora.has_gate_up, lora.has_down)) if present)


def save_adapter(peft_model, save_directory: str, experts_module: str = "mlp.experts",
                 state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Write adapter `adapter_name` as adapter_config.json + adapter_model.safetensors that
    `peft.PeftModel.from_pretrained` loads.

    Linear LoRA and modules_to_save come from peft itself; expert LoRA is converted to target_parameters. The weights
    are read from `state_dict` where given (the model's full state dict gathered across processes: what Trainer and
    accelerate pass under FSDP, where the modules hold only their shards), else from the model.
    """
    from peft import get_peft_model_state_dict
    from peft.utils.constants import DUMMY_TARGET_MODULES

    if state_dict is None:
        _refuse_sharded(peft_model)
        state_dict = peft_model.state_dict()
    experts = _expert_modules(peft_model)
    targets = _targets(next(iter(experts.values()))) if experts else ()
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    if config.target_modules == DUMMY_TARGET_MODULES:  # expert-only LoRA (see fast_model.get_peft_model)
        config.target_modules = set()
    config.target_parameters = [f"{experts_module}.{p}" for p in targets] or None
    config.inference_mode = True  # as PeftModel.save_pretrained writes it

    own = {k: v for k, v in state_dict.items() if not _is_expert_factor(k)}
    tensors = dict(get_peft_model_state_dict(peft_model, state_dict=own, adapter_name=adapter_name))
    for name in experts:
        for param, (key_A, key_B) in expert_peft_keys(name, targets).items():
            part = param.removesuffix("_proj")  # gate_up, down
            factors = [state_dict.get(f"{name}.lora_{ab}_{part}.{adapter_name}.weight") for ab in "AB"]
            if any(f is None for f in factors):
                raise ValueError(f"state_dict: expected {name}.lora_A_{part}.{adapter_name}.weight and its B, the "
                                 "model's expert LoRA; pass the model's full state dict")
            tensors[key_A], tensors[key_B] = expert_factors_to_peft(*(f.detach() for f in factors))

    os.makedirs(save_directory, exist_ok=True)
    config.save_pretrained(save_directory)
    path = os.path.join(save_directory, ADAPTER_WEIGHTS)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    except SafetensorError as err:  # (a full disk surfaces as safetensors' own error): the file system's failure
        raise OSError(f"cannot write {path}: {err}") from None


def _refuse_sharded(model: nn.Module) -> None:
    """A model sharded across processes (FSDP2: DTensor parameters) holds only its shards; gathering them is a
    collective every process must join, which a save called on one process cannot do."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("state_dict: the model is sharded (FSDP); gather its full state dict on every process "
                         "(torch.distributed.checkpoint.state_dict.get_model_state_dict with full_state_dict=True) "
                         "and pass it as save_pretrained(..., state_dict=...)")


def load_adapter_weights(peft_model, adapter_dir: str, adapter_name: str = DEFAULT_ADAPTER) -> None:
    """Load a saved adapter (PEFT format) into the model's adapter `adapter_name`, of the same targets, in place."""
    from peft import set_peft_model_state_dict

    _check_saved_config(peft_model.peft_config[adapter_name], adapter_dir)
    tensors = load_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    for name, module in _expert_modules(peft_model).items():
        lora = expert_lora(module, adapter_name)
        num_experts = (lora.A_gate_up if lora.has_gate_up else lora.A_down).shape[0]
        own = {"gate_up_proj": (lora.A_gate_up, lora.B_gate_up), "down_proj": (lora.A_down, lora.B_down)}
        for param, (key_A, key_B) in expert_peft_keys(name, _targets(module)).items():
            if key_A not in tensors:
                raise ValueError(f"adapter_dir: expected {key_A} in {ADAPTER_WEIGHTS}; was it saved with other targets?")
            A, B = expert_factors_from_peft(tensors.pop(key_A), tensors.pop(key_B), num_experts)
            with torch.no_grad():
                own[param][0].copy_(A)
                own[param][1].copy_(B)
    result = set_peft_model_state_dict(peft_model, tensors, adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"adapter_dir: unexpected keys for this model: {result.unexpected_keys[:5]}")
    missing = [key for key in getattr(result, "missing_keys", ())  # peft's own modules (the experts' loaded above)
               if f".{adapter_name}." in key and not _is_expert_factor(key)]  # the adapter loaded into
    if missing:
        raise ValueError(f"adapter_dir: no weights for this model's {missing[:3]}; was it saved with other targets?")


def _adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json of a saved adapter, as written."""
    try:
        with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"adapter_dir: cannot read {ADAPTER_CONFIG} in {adapter_dir}: {err}") from None


def _check_saved_config(config, adapter_dir: str) -> None:
    """The adapter's rank and scaling must be this model's: factors of another rank do not fit, and another alpha
    would load silently and scale every update differently."""
    saved = _adapter_config(adapter_dir)
    for key in ("r", "lora_alpha", "use_rslora"):
        mine = getattr(config, key, None)
        if key in saved and saved[key] != mine:
            raise ValueError(f"adapter_dir: saved with {key}={saved[key]!r}, this model has {key}={mine!r}")
    # Trained routers (train_router) are peft's modules_to_save: onto a model without them they were dropped.
    theirs, mine = sorted(saved.get("modules_to_save") or []), sorted(config.modules_to_save or [])
    if theirs != mine:
        raise ValueError(f"adapter_dir: saved with modules_to_save={theirs} (train_router), this model has {mine}")


def _untie_adapted_embeddings(model: nn.Module, adapter_dir: str) -> None:
    """Where the input and output embeddings share one weight (tie_word_embeddings) and the adapter changes either
    module (LoRA on lm_head, or a saved copy of it), give the output embedding a weight of its own and untie the
    config: the adapter model adapts only that module, and folding its change into the shared weight would change
    the other one too."""
    configs = [model.config, model.config.get_text_config()]
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return
    adapter = _adapter_config(adapter_dir)
    names = [name for name, module in model.named_modules() if module is inputs or module is outputs]
    targets, keys = adapter.get("target_modules") or [], list(adapter.get("modules_to_save") or [])
    if isinstance(targets, str):  # peft: a regular expression over the whole module name
        adapted = any(re.fullmatch(targets, name) for name in names)
    else:
        adapted, keys = False, keys + list(targets)
    if not adapted and not any(name == key or name.endswith("." + key) for name in names for key in keys):
        return
    if adapter.get("ensure_weight_tying"):
        # One LoRA for both (peft ties the lm_head's factors to the embedding's): peft's merge_and_unload folds it
        # into the shared weight once for each module, twice in all (checked with peft 0.21), and untying leaves
        # the lm_head's factors without a module. Neither gives the adapter model's outputs.
        raise ValueError(f"adapter_dir: {adapter_dir} ties its LoRA on the tied embedding and lm_head "
                         "(ensure_weight_tying), which no merged checkpoint reproduces; load it with peft instead")
    outputs.weight = nn.Parameter(outputs.weight.detach().clone(), requires_grad=outputs.weight.requires_grad)
    for config in configs:
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _check_every_factor_loads(peft_model, adapter_dir: str, model_dir: str) -> None:
    """The adapter's LoRA factors are exactly the ones peft made for this model. peft's load leaves a saved factor
    with no module to go to (an adapter of more layers, or of other modules) unread and says nothing, and one of
    its modules without a saved factor keeps its initial LoRA (B = 0, so that module merges unchanged)."""
    from peft import get_peft_model_state_dict

    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if os.path.isfile(path):
        with safe_open(path, framework="pt") as f:
            saved = set(f.keys())
    else:
        from peft.utils import load_peft_weights

        saved = set(load_peft_weights(adapter_dir, device="cpu"))

    def factors(keys) -> set:
        return {key for key in keys if ".lora_" in key}

    made = factors(get_peft_model_state_dict(peft_model))
    saved = factors(saved)
    if saved - made:
        raise ValueError(f"adapter_dir: {adapter_dir} holds LoRA weights for modules {model_dir} does not have, e.g. "
                         f"{sorted(saved - made)[0]}; was it trained on another model?")
    if made - saved:
        raise ValueError(f"adapter_dir: {adapter_dir} has no LoRA weights for modules it targets in {model_dir}, "
                         f"e.g. {sorted(made - saved)[0]}; was it trained on another model?")


# Files of a checkpoint directory that the merged checkpoint rewrites itself.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def merge(model_dir: str, adapter_dir: str, out_dir: str, *, dtype: torch.dtype | str = "auto") -> str:
    """Fold a PEFT adapter into the checkpoint in model_dir and write a plain transformers checkpoint to out_dir.

    The fold is peft's own `merge_and_unload` (W += s * B @ A per expert for target_parameters); tokenizer
    and processor files are copied over. Returns out_dir.
    """
    import transformers
    from peft import PeftModel

    from .fast_model import check_dtype
    from .models.registry import get_spec

    if not os.path.isdir(model_dir):
        raise ValueError(f"model_dir: expected a local checkpoint directory, got {model_dir!r}")
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG)):
        raise ValueError(f"adapter_dir: expected a directory with {ADAPTER_CONFIG}, got {adapter_dir!r}")
    if not any(os.path.isfile(os.path.join(adapter_dir, name)) for name in (ADAPTER_WEIGHTS, "adapter_model.bin")):
        raise ValueError(f"adapter_dir: no {ADAPTER_WEIGHTS} in {adapter_dir!r}")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"out_dir: {out_dir} exists and is not empty; choose a new directory")
    check_dtype(dtype)
    _adapter_config(adapter_dir)  # a file peft would read with no word of which file it was
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except config_load_errors() as err:
        raise ValueError(f"model_dir: no transformers model config in {model_dir} ({whole_message(err)})") \
            from None
    spec = get_spec(config.model_type)
    try:
        model = from_pretrained_dequantized(  # (quantized experts dequantized: models/quantized.py)
            getattr(transformers, spec.auto_class), model_dir, config, strict=True, dtype=dtype, local_files_only=True,
            use_kernels=False,  # no Hub kernels (5.25's default), offline
        )
    except SafetensorError as err:
        raise ValueError(f"model_dir: cannot read the weights in {model_dir} ({err})") from None
    _untie_adapted_embeddings(model, adapter_dir)
    with peft_deprecation_quiet():
        try:
            adapted = PeftModel.from_pretrained(model, adapter_dir)
        except SafetensorError as err:
            raise ValueError(f"adapter_dir: cannot read the weights in {adapter_dir} ({err})") from None
        except RuntimeError as err:  # torch's load_state_dict: the mismatch is on its second line, not its first
            mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), None)
            if mismatch is None:
                raise
            raise ValueError(f"adapter_dir: {adapter_dir} does not fit {model_dir} ({mismatch})") from None
        _check_every_factor_loads(adapted, adapter_dir, model_dir)
        merged = adapted.merge_and_unload()
    from .training.checkpoint import atomic_dir

    def write(directory: str) -> None:
        merged.save_pretrained(directory)
        for entry in os.listdir(model_dir):
            source = os.path.join(model_dir, entry)
            if not os.path.isfile(source) or entry in _MODEL_FILES or entry.endswith((".safetensors", ".bin", ".pt")):
                continue
            shutil.copy2(source, os.path.join(directory, entry))

    try:
        atomic_dir(out_dir, write)  # a merge that fails leaves no directory that looks finished
    except (OSError, SafetensorError) as err:  # (transformers' writer: a full disk as safetensors' error)
        raise ValueError(f"out_dir: cannot write {out_dir}: {first_line(err)}") from None
    return out_dir
