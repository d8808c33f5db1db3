"""FastMoEModel: load a transformers MoE model with moetune's experts, add LoRA, save PEFT adapters.

    model, tokenizer = FastMoEModel.from_pretrained(model_dir_or_config)
    model = FastMoEModel.get_peft_model(model, r=16, lora_alpha=32)
    ...train with transformers.Trainer / trl.SFTTrainer...
    model.save_pretrained(adapter_dir)                  # loads with plain peft
    moetune.merge(model_dir, adapter_dir, out_dir)      # full checkpoint with LoRA folded in

In training, a forward with labels computes the loss with moetune's fused linear cross-entropy (models/fused_loss.py):
no [tokens, vocab] logits are materialised and `outputs.logits` is a zero placeholder; eval keeps real logits.

LoRA on Linear layers (attention, shared experts, dense MLPs) is peft's own LoRA layer; LoRA on the
fused 3-D expert weights is moetune's split LoRA, stored as parameters on each experts module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from collections.abc import Sequence

import torch
import torch.utils.checkpoint
import transformers
from torch import nn

from . import adapters
from .devices import PLACEMENT_STRATEGIES, check_device_map
from .lora_linear import install_fast_lora_linear
from .models import fused_loss, recompute
from .models.fast_mlp import install_fast_mlp
from .models.fast_norms import install_fast_norms
from .models.fast_rotary import install_fast_rotary, installed_modules
from .models.fast_routers import install_fast_routers
from .models.fast_sinks import install_fast_sinks, runs_flex_with_sinks
from .models.fast_sinks import wrapped as fast_sinks_wrapped
from .models.hook import (
    DEFAULT_ADAPTER,
    add_expert_adapter,
    add_expert_lora,
    delete_expert_adapter,
    expert_adapters,
    expert_lora_disabled,
    find_experts,
    install,
    installed,
    merge_expert_lora,
    remove_expert_lora,
    set_expert_adapter,
)
from .models.quantized import MissingWeights, from_pretrained_dequantized
from .models.registry import get_spec
from .models.spec import ArchSpec
from .training.offload import enable_offloaded_checkpointing

__all__ = ["FastMoEModel", "DEFAULT_TARGET_MODULES"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
# Target names that select LoRA on the fused expert weights (gate_proj / up_proj map onto gate_up_proj,
# which holds both); the same names also select Linear layers of that name (shared experts, dense MLPs).
EXPERT_TARGETS = {"gate_up_proj": "gate_up", "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
# Names that are valid for some supported architecture but may be absent in another (MLA attention has
# no k_proj/v_proj, OLMoE has no dense MLP): absent ones are skipped with a warning, not an error.
COMMON_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", *EXPERT_TARGETS})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SPEC_ATTR = "moetune_spec"


def _check_local_source(source) -> str | None:
    if isinstance(source, transformers.PretrainedConfig):
        return None
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):  # an adapter or tokenizer directory, say
            raise ValueError(f"model_dir_or_config: {os.fspath(source)!r} has no config.json (not a model checkpoint)")
        return os.fspath(source)
    shown = repr(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__  # (not a model's repr)
    raise ValueError(
        "model_dir_or_config: expected a local checkpoint directory or a transformers config object "
        f"(moetune never downloads), got {shown}"
    )


def _has_lora(model) -> bool:
    """Whether get_peft_model already put LoRA on the model (peft's layers, or expert LoRA)."""
    return (bool(getattr(model, "peft_config", None)) or _has_peft_layers(model)
            or any(expert_adapters(module) for module in model.modules()))


DTYPE_NAMES = ("auto", "bfloat16", "float16", "float32")


def check_dtype(dtype) -> None:
    """dtype for from_pretrained / merge: a torch floating dtype, or one of DTYPE_NAMES."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return
    raise ValueError(f"dtype: expected a torch floating dtype or one of {', '.join(map(repr, DTYPE_NAMES))}, "
                     f"got {dtype!r}")


# torch's compiled flex attention refuses query/key/value head dims below 16 ("NYI: embedding dimension ... must be
# at least 16", raised when the first step compiles it).
FLEX_MIN_HEAD_DIM = 16


def _head_dim(config) -> int | None:
    """The attention head dim of `config` (head_dim, else hidden_size / heads), None where neither is set."""
    dim = getattr(config, "head_dim", None)
    if dim is None and getattr(config, "hidden_size", None) and getattr(config, "num_attention_heads", None):
        dim = config.hidden_size // config.num_attention_heads
    return dim


def choose_attention(spec: ArchSpec, requested: str | None, device_map, config=None) -> str:
    """The requested attention implementation if it is correct for the model, else the spec's preferred one that
    runs here: flex attention only on CUDA, and only at head dims torch's flex kernels take."""
    if requested is not None:
        if requested == "sdpa" and "sdpa" not in spec.attn_implementations:
            raise ValueError(
                f"attn_implementation: {spec.model_type} needs one of {', '.join(spec.attn_implementations)} "
                "(sdpa has no attention sinks), got 'sdpa'"
            )
        return requested
    on_cuda = torch.cuda.is_available() and device_map not in (None, "cpu") and str(device_map) != "cpu"
    for impl in spec.attn_implementations:
        if impl == "flex_attention" and not on_cuda:  # flex needs torch.compile on a GPU to be usable
            continue
        if impl == "flex_attention" and (_head_dim(config) or FLEX_MIN_HEAD_DIM) < FLEX_MIN_HEAD_DIM:
            continue
        return impl
    raise AssertionError(f"{spec.model_type}: no usable attention implementation in {spec.attn_implementations}")


def _load_tokenizer(model_dir: str | None, max_seq_length: int):
    if model_dir is None or not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    return transformers.AutoTokenizer.from_pretrained(
        model_dir, local_files_only=True, model_max_length=max_seq_length
    )


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def plan_targets(model: nn.Module, spec: ArchSpec, target_modules) -> tuple[list[str], bool, bool]:
    """(Linear module names for peft, expert gate_up LoRA?, expert down LoRA?) from the user's target names."""
    names = (target_modules,) if isinstance(target_modules, str) else target_modules
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"target_modules: expected a non-empty sequence of module names, got {target_modules!r}")
    routers = {r.rsplit(".", 1)[-1] for r in spec.router_modules}
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)} - routers
    if set(names) == set(DEFAULT_TARGET_MODULES):  # attention and experts: the architecture's attention projections
        names = (*(n for n in spec.attention_targets if n in linear), *DEFAULT_TARGET_MODULES[4:])
    for name in names:
        if name in routers:
            raise ValueError(
                f"target_modules: {name!r} is a router; routers never get LoRA (pass train_router=True to train them)"
            )
        if name not in linear and name not in COMMON_TARGETS:
            raise ValueError(
                f"target_modules: expected names from {', '.join(sorted(linear | set(EXPERT_TARGETS)))}, got {name!r}"
            )
    absent = [n for n in names if n not in linear and n not in EXPERT_TARGETS]
    if absent:
        warnings.warn(f"target_modules: {', '.join(absent)} not in this {spec.model_type} model; skipped", stacklevel=3)
    parts = {EXPERT_TARGETS[n] for n in names if n in EXPERT_TARGETS}
    selected = {n for n in names if n in linear}
    remapped = selected & peft_expert_aliases(model, selected)
    if remapped:
        warnings.warn(
            f"target_modules: on {spec.model_type} peft reads {', '.join(sorted(remapped))} as the fused experts' "
            "weights, so an adapter with LoRA on the Linear layers of that name (shared experts, dense MLPs) would "
            "not load in peft; those Linear layers get no LoRA",
            stacklevel=3,
        )
    return sorted(selected - remapped), "gate_up" in parts, "down" in parts


def peft_expert_aliases(model: nn.Module, names: set[str]) -> set[str]:
    """Names peft remaps from target_modules onto the fused expert parameters for this model.

    peft >= 0.19 on transformers v5 reads v4 expert names (gate_proj, up_proj, down_proj) in target_modules as the
    fused experts' parameters for the qwen2_moe-pattern families (qwen3_moe, olmoe, deepseek_v3, glm4_moe, ...):
    peft 0.19-0.21 moves them to target_parameters, whether or not Linear layers of that name exist; peft 0.22 keeps
    the Linear targets where there are some and adds the experts' parameters beside them (LoRA on the experts,
    gate_up at twice the rank). Either way an adapter with LoRA on Linear layers of such a name does not load in
    peft as it was trained. Asking peft's own converter, name by name, keeps this in step with the installed peft
    (a peft-internal module: absent -> no remapping).
    """
    if not names:
        return set()
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return set()
    from peft import LoraConfig

    # peft refuses one of gate_proj / up_proj without the other where they are fused into gate_up_proj; moetune
    # reads either as the fused weight (EXPERT_TARGETS), so ask about both together.
    pair = {"gate_proj", "up_proj"}
    # A name peft reads as the experts' always adds target_parameters (0.21 moving it there, 0.22 beside it).
    groups = [{name} for name in names - pair] + ([pair] if names & pair else [])
    aliases = set()
    for group in groups:
        config = LoraConfig(r=1, target_modules=sorted(group))
        convert_peft_config_for_transformers(config, model=model, conversions=None)
        if config.target_parameters:
            aliases |= group
    return aliases & names


def _enable_checkpointing(model, checkpoint_layers: int | None = None) -> None:
    # transformers >= 5.2x renamed gradient_checkpointing_enable to activation_checkpointing_enable and
    # deprecated the old name; 5.17 has only the old one.
    kwargs = {"use_reentrant": False}  # non-reentrant: no need for inputs that require grad
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # (config.use_cache stays the user's: transformers' merge_with_config_defaults drops the KV cache itself in a
    # training forward of a model with checkpointing on, 5.17 - 5.25, every supported architecture)
    _mark_recomputes(model)
    if checkpoint_layers is not None:
        # transformers checks the flag on each layer at call time (GradientCheckpointingLayer.__call__).
        for layer in _decoder_layers(model)[checkpoint_layers:]:
            layer.gradient_checkpointing = False


def _mark_recomputes(model) -> None:
    """Run each layer's checkpoint through moetune.models.recompute.checkpoint (torch's, with the recompute
    marked, so the experts skip what only the discarded output needs). transformers installs
    partial(torch.utils.checkpoint.checkpoint, **options) on each layer; anything else is left as it is."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None) if isinstance(module, GradientCheckpointingLayer) else None
        if isinstance(func, functools.partial) and func.func is torch.utils.checkpoint.checkpoint:
            module._gradient_checkpointing_func = functools.partial(recompute.checkpoint, *func.args, **func.keywords)


def _decoder_layers(model) -> list:
    """The decoder layers in model order (a vision tower's blocks are GradientCheckpointingLayers too: not these)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [
        m for m in model.modules()
        if isinstance(m, GradientCheckpointingLayer) and type(m).__name__.endswith("DecoderLayer")
    ]


def _has_peft_layers(model) -> bool:
    """Whether peft holds layers of its own in the model (LoRA on Linear layers, a trained router)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in model.modules())


def _requires_grad_kept(model: nn.Module):
    """A function that sets every parameter the model has now back to its requires_grad of now."""
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)

    return restore


def _peft_model_class():
    from peft import PeftModelForCausalLM

    class FastMoEPeftModel(PeftModelForCausalLM):
        """peft's causal-LM wrapper whose adapter operations also cover moetune's expert LoRA, which lives outside
        peft's layers: save and load, disable, several adapters (add, set, delete: TRL's DPO, KTO and GRPO keep
        their reference as a second adapter), merge and unmerge (TRL's weight sync to vLLM), unload."""

        def _experts(self) -> list[nn.Module]:
            return [module for module in self.modules() if expert_adapters(module)]

        def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                            selected_adapters: list[str] | None = None, is_main_process: bool = True,
                            state_dict: dict | None = None, **kwargs) -> None:
            """Write each adapter (`selected_adapters`, default all) as a PEFT adapter directory, expert LoRA in the
            target_parameters layout, where peft writes it: "default" in save_directory, any other in
            save_directory/<name>.

            state_dict: the model's full state dict, where the modules hold only shards (FSDP: Trainer and
            accelerate gather it and pass it here). safe_serialization and other peft keyword arguments are
            accepted and ignored: the adapter is always written as safetensors.
            """
            names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
            unknown = [name for name in names if name not in self.peft_config]
            if unknown:
                raise ValueError(f"selected_adapters: expected names among {list(self.peft_config)}, got {unknown}")
            if not is_main_process:
                return
            experts_module = getattr(self, _SPEC_ATTR).experts_module
            for name in names:
                directory = save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name)
                adapters.save_adapter(self, directory, experts_module=experts_module, state_dict=state_dict,
                                      adapter_name=name)

        def load_adapter(self, model_id: str, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
                         **kwargs) -> None:
            """Load a saved adapter's weights into adapter `adapter_name`: in place where the model has it (what
            Trainer's resume calls), else as a new adapter (add_adapter: frozen until set_adapter makes it active;
            TRL loads its reference adapter so). It must have this model's rank, alpha and targets.
            is_trainable: a new adapter's parameters require grad (as peft's); other peft keyword arguments are
            accepted and ignored."""
            new = adapter_name not in self.peft_config
            if new:
                restore_requires_grad = _requires_grad_kept(self)
                self.add_adapter(adapter_name, copy.deepcopy(next(iter(self.peft_config.values()))))
            try:
                adapters.load_adapter_weights(self, model_id, adapter_name)
            except BaseException:
                if new:  # nothing half-loaded left behind, and every other parameter as it was
                    self.delete_adapter(adapter_name)
                    restore_requires_grad()
                raise
            if new and is_trainable:
                for name, p in self.named_parameters():
                    if f".{adapter_name}." in name:
                        p.requires_grad_(True)

        def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False, **kwargs) -> None:
            """peft's add_adapter, the expert LoRA included: a fresh adapter (A uniform, B = 0), frozen until made
            active. Of the first adapter's rank and alpha where the experts have LoRA (the engine takes one scale)."""
            experts = self._experts()
            first = self.peft_config[DEFAULT_ADAPTER] if DEFAULT_ADAPTER in self.peft_config else None
            if experts and first is not None and any(
                    getattr(peft_config, key, None) != getattr(first, key, None) for key in ("r", "lora_alpha", "use_rslora")):
                raise ValueError(f"peft_config: with LoRA on the experts every adapter takes the first one's r, lora_alpha "
                                 f"and use_rslora ({first.r}, {first.lora_alpha}, {first.use_rslora})")
            if adapter_name in self.peft_config:
                raise ValueError(f"adapter_name: {adapter_name!r} exists already")
            # peft freezes every parameter where it finds none of its own layers (LoRA on the experts only): the
            # parameters there before keep their state.
            restore_requires_grad = _requires_grad_kept(self)
            super().add_adapter(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
            restore_requires_grad()
            for module in experts:
                add_expert_adapter(module, adapter_name)

        def _unmerge_experts(self) -> None:
            """As peft does for its layers before a switch: an adapter merged into the experts' weights comes out."""
            for module in self._experts():
                merge_expert_lora(module, False)

        def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
            """peft's set_adapter, the experts computing with that adapter's LoRA too (trainable unless
            inference_mode, the others frozen, as peft does for its layers); a merged adapter is unmerged first."""
            if adapter_name not in self.peft_config:
                raise ValueError(f"adapter_name: expected one of {list(self.peft_config)}, got {adapter_name!r}")
            self._unmerge_experts()
            super().set_adapter(adapter_name, inference_mode=inference_mode)
            for module in self._experts():
                set_expert_adapter(module, adapter_name, trainable=not inference_mode)

        def delete_adapter(self, adapter_name: str) -> None:
            """peft's delete_adapter, the experts' factors too; deleting the active adapter makes the first one left
            active (and trainable), as peft does for its layers."""
            if adapter_name not in self.peft_config:
                raise ValueError(f"adapter_name: expected one of {list(self.peft_config)}, got {adapter_name!r}")
            was_active = adapter_name == self.active_adapter
            self._unmerge_experts()
            super().delete_adapter(adapter_name)
            for module in self._experts():
                delete_expert_adapter(module, adapter_name)
            # peft leaves the active adapter unset where it holds no layers of its own (LoRA on the experts only)
            if was_active or not self.base_model.active_adapters:
                self.set_adapter(self.active_adapter if self.active_adapter in self.peft_config
                                 else next(iter(self.peft_config)))

        @contextlib.contextmanager
        def disable_adapter(self):
            """The base model within, the expert LoRA off too (TRL's reference model for DPO, KTO, GRPO uses this).
            peft's own context switches its layers (Linear LoRA, a trained router); with none (LoRA on the experts
            only) it would refuse, so only the flag it sets is set."""
            experts = self._experts()
            self._unmerge_experts()  # peft's merged layers unmerge themselves when disabled
            with contextlib.ExitStack() as stack:
                if _has_peft_layers(self):
                    stack.enter_context(super().disable_adapter())
                else:
                    was_disabled = self._adapters_disabled
                    self._adapters_disabled = True
                    stack.callback(setattr, self, "_adapters_disabled", was_disabled)
                stack.enter_context(expert_lora_disabled(experts))
                yield

        def _check_merged_names(self, adapter_names) -> None:
            if adapter_names is not None and list(adapter_names) != [self.active_adapter]:
                raise ValueError(f"adapter_names: moetune merges the active adapter, {self.active_adapter!r}, got {adapter_names!r}")

        def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
            """Fold the active adapter into the base weights (the experts' too, in their dtype); the model then
            computes without LoRA until unmerge_adapter. TRL merges so to send the weights to vLLM."""
            self._check_merged_names(adapter_names)
            self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
            for module in self._experts():
                merge_expert_lora(module, True)

        def unmerge_adapter(self) -> None:
            self.base_model.unmerge_adapter()
            for module in self._experts():
                merge_expert_lora(module, False)

        def unload(self):
            """The base model: LoRA removed, experts' too, without merging (weights merged before stay merged)."""
            for module in self._experts():
                remove_expert_lora(module)
            return self.base_model.unload()

        def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None):
            """The base model with the active adapter folded into its weights, in their dtype (moetune.merge folds a
            saved adapter into a checkpoint on disk)."""
            self._check_merged_names(adapter_names)
            for module in self._experts():
                merge_expert_lora(module, True)
                remove_expert_lora(module)
            return self.base_model.merge_and_unload(progressbar=progressbar, safe_merge=safe_merge,
                                                    adapter_names=adapter_names)

    return FastMoEPeftModel


class FastMoEModel:
    """Entry points (static): from_pretrained, get_peft_model."""

    @staticmethod
    def from_pretrained(
        model_dir_or_config,
        max_seq_length: int = 4096,
        dtype: torch.dtype | str = torch.bfloat16,
        device_map=None,
        attn_implementation: str | None = None,
        fused_cross_entropy: bool = True,
        fused_norms: bool = True,
        fused_rotary: bool = True,
        fused_router: bool = True,
        fused_mlp: bool = True,
        fused_sinks: bool = True,
        strict: bool = False,
        **kwargs,
    ):
        """(model, tokenizer or None) from a local checkpoint directory, or (model, None) from a config (random init).

        The model is the transformers model with its expert compute routed through moetune.
        fused_cross_entropy: in training (model.train(), grad enabled, labels given) compute the loss chunk by
          chunk from the hidden states and lm_head's weight, never holding the [tokens, vocab] logits; the output's
          `logits` is then a zero placeholder (stride 0). False: transformers' own lm_head + loss.
        fused_norms: run the RMSNorms through moetune's Triton kernel (one launch forward, one backward) on CUDA
          GPUs (each call falls back to transformers' forward where the kernel cannot run); False keeps transformers' own.
        fused_rotary: on CUDA GPUs, the rotary embedding of the attention as one Triton launch each way instead of
          several elementwise ones (MLA attention, deepseek_v3 and glm4_moe_lite: the rotary, query, key and value
          in one launch each way). transformers looks the function up in its modeling module, so it is swapped
          there, for every model of that architecture in the process (bitwise the same results); False does
          not undo an earlier model's swap (moetune.models.fast_rotary.uninstall_fast_rotary() does; a warning
          says so).
        fused_router: on NVIDIA GPUs, a softmax router's softmax, top-k and normalisation as one Triton launch each
          way (qwen3_moe, qwen2_moe, olmoe, qwen3_vl_moe, mixtral, gpt_oss; the experts transformers chooses, the
          weights within ~1e-6 relative of transformers' before rounding). False keeps transformers' ops.
        fused_mlp: on CUDA GPUs, a gated MLP's silu(gate) * up (shared experts, dense layers) as one Triton launch
          each way instead of five (moetune/models/fast_mlp.py; within one rounding of transformers' result).
          False keeps transformers' ops.
        fused_sinks: on CUDA GPUs, gpt-oss's attention sinks applied to flex attention's output in one Triton launch
          each way instead of about a dozen (moetune/models/fast_sinks.py; within one rounding of transformers'
          result), and plain causal layers on cuDNN's fused attention with the sinks after it (gpt-oss-20b at 8K on
          an H100: 18,101 tok/s against 17,104 with flex attention and transformers' sinks, run 63). transformers'
          "flex_attention" function is wrapped for the whole process (calls without sinks pass through); False does
          not undo an earlier model's wrap (moetune.models.fast_sinks.uninstall_fast_sinks() does; a warning says
          so).
        strict: refuse a checkpoint that lacks any of the model's weights (ValueError), where transformers would
          start them at random values with a warning (`moetune train` and `moetune merge` load so).
        Extra keyword arguments go to transformers' from_pretrained / from_config.
        """
        _check_positive_int("max_seq_length", max_seq_length)
        check_dtype(dtype)
        _check_bool("fused_cross_entropy", fused_cross_entropy)
        _check_bool("fused_norms", fused_norms)
        _check_bool("fused_rotary", fused_rotary)
        _check_bool("fused_router", fused_router)
        _check_bool("fused_mlp", fused_mlp)
        _check_bool("fused_sinks", fused_sinks)
        _check_bool("strict", strict)
        check_device_map(device_map)
        model_dir = _check_local_source(model_dir_or_config)
        if model_dir is not None:
            config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        else:
            config = model_dir_or_config
        spec = get_spec(config.model_type)
        attn = choose_attention(spec, attn_implementation, device_map, config)
        auto = getattr(transformers, spec.auto_class)
        if model_dir is not None:
            # transformers >= 5.25 swaps in the `kernels` library's Hub kernels by default (downloaded at load time,
            # replacing modules moetune patches); moetune brings its own. Accepted (default off) since 5.17.
            kwargs.setdefault("use_kernels", False)
            try:
                model = from_pretrained_dequantized(
                    auto, model_dir, config, strict=strict, dtype=dtype, device_map=device_map,
                    attn_implementation=attn, local_files_only=True, **kwargs,
                )
            except MissingWeights as err:
                raise err.naming("model_dir_or_config") from None
        else:
            if isinstance(device_map, dict) or device_map in PLACEMENT_STRATEGIES:
                raise ValueError(f"device_map: expected a device for a config (random init), got {device_map!r}")
            # Build (and randomly initialise) the weights where they will live: a 30B model initialised
            # on the CPU first would need its whole size in host memory and minutes of CPU time.
            # (a copy of the config: the model keeps its own, and moetune sets its own)
            with torch.device("cpu" if device_map is None else device_map):
                model = auto.from_config(copy.deepcopy(config), dtype=dtype, attn_implementation=attn, **kwargs)
        install(model, spec)
        if fused_cross_entropy:
            fused_loss.install(model)
        if fused_norms and torch.cuda.is_available():  # never Triton's CPU interpreter here: minutes instead of seconds
            install_fast_norms(model)
        if fused_router and torch.cuda.is_available():
            install_fast_routers(model)
        if fused_mlp and torch.cuda.is_available():
            install_fast_mlp(model)
        if fused_rotary and torch.cuda.is_available():
            install_fast_rotary(model)
        elif not fused_rotary and type(model).__module__ in installed_modules():
            warnings.warn(
                "fused_rotary=False: an earlier model of this architecture swapped in the fused rotary for the whole "
                "process (bitwise the same results); moetune.models.fast_rotary.uninstall_fast_rotary() removes it",
                stacklevel=2,
            )
        if fused_sinks and torch.cuda.is_available() and runs_flex_with_sinks(model):
            install_fast_sinks()
        elif not fused_sinks and runs_flex_with_sinks(model) and fast_sinks_wrapped():
            warnings.warn(
                "fused_sinks=False: an earlier model wrapped transformers' flex attention for the whole process; "
                "moetune.models.fast_sinks.uninstall_fast_sinks() removes it",
                stacklevel=2,
            )
        setattr(model, _SPEC_ATTR, spec)
        model.max_seq_length = max_seq_length
        return model, _load_tokenizer(model_dir, max_seq_length)

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        lora_alpha: float = 32,
        target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES,
        lora_dropout: float = 0.0,
        use_gradient_checkpointing: bool = True,
        offload_checkpoints: bool | None = None,
        checkpoint_layers: int | None = None,
        train_router: bool = False,
        random_state: int | None = None,
        lora_groups: bool = True,
    ):
        """LoRA on the target modules; everything else frozen. Returns a peft model (PeftModelForCausalLM).

        r, lora_alpha: rank and alpha (scaling = lora_alpha / r), for experts and Linear layers alike.
        target_modules: Linear module names and the experts' (gate_up_proj, down_proj). The default, attention and
          experts, stands for each architecture's own attention projections (ArchSpec.attention_targets: DeepSeek-V3
          and GLM-4.7-Flash's latent attention has q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj).
        lora_dropout: Linear LoRA only; 0 where the experts get LoRA (PEFT's expert LoRA has none, and refuses to load
          an adapter that records one).
        train_router: train router weights in full (saved as peft modules_to_save); default frozen.
        random_state: seed for the LoRA initialisation.
        offload_checkpoints: with checkpointing, keep each decoder layer's saved input in pinned host memory
          between forward and backward (copied on a side stream, prefetched a layer ahead): layers x tokens x
          hidden x 2 bytes less GPU memory (6 GiB for a 48-layer model at 32K). None: on where the model is on CUDA.
        checkpoint_layers: with checkpointing, how many decoder layers, counted from the first, are checkpointed
          (None: all). The others keep their activations on the GPU from forward to backward and are not
          recomputed, as Megatron-LM's block recompute does: each layer left out saves its forward's time in
          every step (about a quarter of a layer's step time) and costs its activations in memory, 0.45 GiB
          per 8K tokens for Qwen3-30B-A3B (measured). For models with memory to spare (few layers, short contexts).
        lora_groups: sibling LoRA projections that read one input (q/k/v; MLA's q_a and kv_a; gate and up) computed
          by one autograd Function (moetune/lora_groups.py); False: one Function a projection.
        """
        from peft import LoraConfig
        from peft.utils.constants import DUMMY_TARGET_MODULES

        _check_positive_int("r", r)
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not 0 < lora_alpha < float("inf"):
            raise ValueError(f"lora_alpha: expected a finite number > 0, got {lora_alpha!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise ValueError(f"lora_dropout: expected a number in [0, 1), got {lora_dropout!r}")
        _check_bool("use_gradient_checkpointing", use_gradient_checkpointing)
        if offload_checkpoints is not None:
            _check_bool("offload_checkpoints", offload_checkpoints)
        _check_bool("train_router", train_router)
        _check_bool("lora_groups", lora_groups)
        if checkpoint_layers is not None and (
            isinstance(checkpoint_layers, bool) or not isinstance(checkpoint_layers, int) or checkpoint_layers < 0
        ):
            raise ValueError(f"checkpoint_layers: expected None or an integer >= 0, got {checkpoint_layers!r}")
        spec = getattr(model, _SPEC_ATTR, None)
        if spec is None or not isinstance(model, transformers.PreTrainedModel):
            raise ValueError(
                f"model: expected a model from moetune.FastMoEModel.from_pretrained, got {type(model).__name__}"
            )
        if _has_lora(model):
            raise ValueError("model: it already has LoRA from an earlier get_peft_model (a second would change the "
                             "first's modules); load it again with moetune.FastMoEModel.from_pretrained")
        if checkpoint_layers is not None and checkpoint_layers > (count := len(_decoder_layers(model))):
            raise ValueError(f"checkpoint_layers: expected at most the model's {count} decoder layers, got {checkpoint_layers}")
        linear, gate_up, down = plan_targets(model, spec, target_modules)
        if lora_dropout and (gate_up or down):
            # peft's expert LoRA (ParamWrapper, target_parameters) refuses any dropout: the adapter would not load.
            raise ValueError(f"lora_dropout: expected 0 with LoRA on the experts (PEFT's expert LoRA has no dropout, "
                             f"so the saved adapter would not load), got {lora_dropout!r}")
        if random_state is not None:
            torch.manual_seed(random_state)

        experts = find_experts(model, spec)
        if not all(installed(module) for module in experts.values()):
            raise ValueError("model: its experts no longer run on moetune (moetune.models.uninstall); load it again with "
                             "moetune.FastMoEModel.from_pretrained")
        for p in model.parameters():
            p.requires_grad_(False)
        if offload_checkpoints and not use_gradient_checkpointing:
            warnings.warn("offload_checkpoints: needs use_gradient_checkpointing=True; ignored", stacklevel=2)
        if checkpoint_layers is not None and not use_gradient_checkpointing:
            warnings.warn("checkpoint_layers: needs use_gradient_checkpointing=True; ignored", stacklevel=2)
        if use_gradient_checkpointing:
            _enable_checkpointing(model, checkpoint_layers)
            if offload_checkpoints is None:
                offload_checkpoints = any(p.is_cuda for p in model.parameters())
            if offload_checkpoints:  # on every layer, also those a later memory plan checkpoints
                enable_offloaded_checkpointing(model)
        config = LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none", task_type="CAUSAL_LM",
            # peft refuses a config that targets nothing; its dummy target builds an empty LoRA model.
            target_modules=linear or DUMMY_TARGET_MODULES,
            modules_to_save=list(spec.router_modules) if train_router else None,
            # as peft.get_peft_model sets it: AutoPeftModel finds the base model by it, and saving compares the
            # vocabulary with the base's (a resized one saves the embeddings with the adapter)
            base_model_name_or_path=model.__dict__.get("name_or_path") or None,
        )
        with adapters.peft_deprecation_quiet():
            peft_model = _peft_model_class()(model, config)
        if gate_up or down:
            for module in experts.values():
                add_expert_lora(module, r, lora_alpha, gate_up=gate_up, down=down)
        # peft's Linear LoRA runs its adapters in fp32 (CUDA-core GEMMs, casts, fp32 copies of x saved): one
        # autograd Function in the activation dtype instead, wherever the layer's state allows (else peft's path).
        install_fast_lora_linear(peft_model, groups=lora_groups)
        setattr(peft_model, _SPEC_ATTR, spec)
        return peft_model

    @staticmethod
    def fit_checkpoint_layers(
        model, batch_size: int, seq_len: int, *, memory_fraction: float = 0.9, max_memory_gib: float | None = None,
        optimizer: str = "adamw", keep_attention: bool = True, step_in_backward: bool = False, memory=None,
    ) -> dict:
        """Checkpoint only as many decoder layers as the GPU needs for steps of [batch_size, seq_len] tokens, and
        let checkpointed layers keep their attention output where memory allows (their recompute then skips the
        attention kernel; sdpa attention only).

        Runs a probe step (forward + backward, no optimizer step; clears .grad and the peak-memory statistics),
        measures the peak, the first and last layers' activations and the attention output a checkpointed layer
        keeps, and spends what fits in memory_fraction of the memory this process can have (or in max_memory_gib
        GiB, if less: a smaller card to plan for, a shared GPU), with the optimizer's state (adamw: 8 bytes per
        trainable parameter, adamw_bf16: 4, adamw_8bit: 2): first on kept attention, then on layers left out of checkpointing
        (they skip their recompute). A plan beyond every layer checkpointed is then checked by a probe step with
        the plan itself and cut back while that is over the budget (up to three probes in all after the first).
        keep_attention=False: no layer keeps it. step_in_backward: plan for the optimizer stepping inside the
        backward pass (training/step_in_backward.py: no buffer of every gradient). Returns the measurements and the choice
        (moetune/checkpoint_plan.py); on CPU it changes nothing; if the probe runs out of memory every layer stays
        checkpointed; "why" says so, or that even every layer checkpointed is estimated over the budget, or that
        the checks fell back to it. memory: a stand-in for the CUDA allocator (tests).
        """
        from .checkpoint_plan import fit_checkpoint_layers

        return fit_checkpoint_layers(
            model, batch_size, seq_len, memory_fraction=memory_fraction, max_memory_gib=max_memory_gib,
            optimizer=optimizer, keep_attention=keep_attention, step_in_backward=step_in_backward, memory=memory,
        )
