"""Fused cross-entropy inside transformers' own CausalLM forward: the loss without the [tokens, vocab] logits.

Every supported CausalLM forward (all nine architectures, transformers 5.17 to 5.23) ends in

    logits = self.lm_head(hidden_states[:, slice_indices, :])
    if labels is not None:
        loss = self.loss_function(logits, labels, vocab_size, **kwargs)     # ForCausalLMLoss
    if output_router_logits:
        aux_loss = ...; loss += router_aux_loss_coef * aux_loss

`install` adds four forward hooks and sets transformers' per-instance `loss_function` (its public setter):

    model pre-hook      arms the fused path for this call when labels are given, the model is training, grad is
                        enabled and lm_head is still the hooked nn.Linear (peft LoRA on lm_head: not fused)
    lm_head pre-hook    when armed: keeps the input hidden states, hands the Linear an empty batch instead
    lm_head hook        returns a placeholder for the logits: a zero expanded to [..., V] (stride 0, no memory)
    loss_function       causal_lm_loss(kept hidden states, lm_head.weight, labels, ...) when something was kept,
                        else the original ForCausalLMLoss
    model hook          disarms, also after an exception; raises if hidden states were kept but the forward never
                        called loss_function (it would otherwise hand out a loss computed from the placeholder)

The rest of the forward runs as written: the router aux loss is added to the fused loss, `num_items_in_batch` and
`shift_labels` reach the loss through the forward's kwargs. No module is replaced and no class patched, so the
state dict keys (lm_head.weight, ...) and what peft saves or merges are unchanged; `uninstall` removes it all.
Eval, no_grad and calls without labels get real logits.

Why not a module wrapping lm_head: it renames lm_head.weight in the state dict, and trl's own fused head reads
get_output_embeddings().weight. Why not a forward of our own: one per architecture (aux loss, coefficients, vision
inputs differ), which is what transformers' forward already gets right.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from ..linear_cross_entropy import causal_lm_loss

__all__ = ["FusedCrossEntropy", "install", "installed", "uninstall"]

_ATTR = "moetune_fused_cross_entropy"


class FusedCrossEntropy:
    """The hooks and the loss function of one model (see the module docstring). A plain object, not a module:
    it adds nothing to the state dict, and `copy.deepcopy(model)` copies it bound to the copy's modules."""

    def __init__(self, model: nn.Module, lm_head: nn.Linear, previous_loss_function, had_own_loss_function: bool):
        self.lm_head = lm_head
        self.previous_loss_function = previous_loss_function
        self.had_own_loss_function = had_own_loss_function
        self.armed = False
        self.kept: tuple[torch.Tensor, nn.Linear] | None = None
        self.warned = False
        self.labels_position = _positional_index(model, "labels")
        self.handles = [
            model.register_forward_pre_hook(self.before_model, with_kwargs=True),
            model.register_forward_hook(self.after_model, always_call=True),
            lm_head.register_forward_pre_hook(self.before_lm_head),
            lm_head.register_forward_hook(self.after_lm_head),
        ]

    def _labels(self, args, kwargs):
        if "labels" in kwargs:
            return kwargs["labels"]
        if self.labels_position is not None and self.labels_position < len(args):
            return args[self.labels_position]
        return None

    def before_model(self, model, args, kwargs):
        self.kept = None
        self.armed = model.training and torch.is_grad_enabled() and self._labels(args, kwargs) is not None
        if self.armed and model.get_output_embeddings() is not self.lm_head:
            self.armed = False
            if not self.warned:
                self.warned = True
                kind = type(model.get_output_embeddings())
                warnings.warn(
                    f"fused_cross_entropy: the output embeddings are a {kind.__module__}.{kind.__qualname__} now "
                    "(LoRA or modules_to_save on lm_head?), not the nn.Linear it was installed on; the loss is "
                    "computed from full logits",
                    stacklevel=2,
                )

    def after_model(self, model, args, output):
        self.armed = False
        kept, self.kept = self.kept, None
        if kept is not None and output is not None:  # output None: the forward raised, its error goes up
            raise RuntimeError(
                f"fused_cross_entropy: {type(model).__name__}.forward called lm_head with labels but not "
                "self.loss_function, so its loss would come from placeholder logits; load the model with "
                "fused_cross_entropy=False"
            )

    def before_lm_head(self, lm_head, args):
        if not self.armed:
            return None
        self.armed = False  # one lm_head call per forward
        (hidden,) = args
        self.kept = (hidden, lm_head)
        return (hidden.new_empty((0, hidden.shape[-1])),)

    def after_lm_head(self, lm_head, args, output):
        if self.kept is None or self.kept[1] is not lm_head:
            return None
        hidden = self.kept[0]
        return output.new_zeros(()).expand(*hidden.shape[:-1], output.shape[-1])

    def __call__(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                 **kwargs):
        """transformers' loss_function signature (ForCausalLMLoss)."""
        kept, self.kept = self.kept, None
        if kept is None:
            return self.previous_loss_function(
                logits, labels, vocab_size, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                shift_labels=shift_labels, **kwargs,
            )
        hidden, lm_head = kept
        # Under accelerate's device_map the hook sees the input before accelerate moves it to lm_head's device.
        hidden = hidden.to(lm_head.weight.device)
        return causal_lm_loss(
            hidden, lm_head.weight, labels, shift_labels=shift_labels, bias=lm_head.bias, ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch,
        )


def _positional_index(model: nn.Module, name: str) -> int | None:
    params = list(inspect.signature(model.forward).parameters)
    return params.index(name) if name in params else None


def installed(model: nn.Module) -> FusedCrossEntropy | None:
    return getattr(model, _ATTR, None)


def install(model: nn.Module) -> bool:
    """Fuse the LM head and the causal-LM loss of this model instance in training. Idempotent.

    Returns False (with a warning) when the model does not have the shape this relies on: an nn.Linear output
    embedding and transformers' ForCausalLMLoss as its loss function.
    """
    if installed(model) is not None:
        return True
    lm_head = model.get_output_embeddings()
    if type(lm_head) is not nn.Linear:
        warnings.warn(f"fused_cross_entropy: the output embeddings are a {type(lm_head).__name__}, not an "
                      "nn.Linear; not installed", stacklevel=2)
        return False
    had_own = "_loss_function" in model.__dict__
    previous = model.loss_function
    if previous is not ForCausalLMLoss:
        warnings.warn(f"fused_cross_entropy: the model's loss function is {getattr(previous, '__name__', previous)}, "
                      "not transformers' ForCausalLMLoss; not installed", stacklevel=2)
        return False
    fused = FusedCrossEntropy(model, lm_head, previous, had_own)
    setattr(model, _ATTR, fused)
    model.loss_function = fused
    return True


def uninstall(model: nn.Module) -> None:
    """Undo `install`: hooks removed, the previous loss function back."""
    fused = installed(model)
    if fused is None:
        return
    for handle in fused.handles:
        handle.remove()
    if fused.had_own_loss_function:
        model.loss_function = fused.previous_loss_function
    else:
        del model._loss_function
    delattr(model, _ATTR)
