"""The MoE expert engine: grouped expert GEMMs over expert-sorted rows with split LoRA.

Imports torch only (never transformers), so it is testable and usable on its own.
"""

from .activations import Activation, GeGLU, GptOssGLU, SwiGLU, get_activation
from .api import moe_experts
from .backends import ENV_VAR, KNOWN_BACKENDS, available_backends, select_backend
from .lora import ExpertLoRA
from .reference import reference_moe_experts
from .routing import RoutingPlan, plan_routing

__all__ = [
    "moe_experts",
    "ExpertLoRA",
    "available_backends",
    "select_backend",
    "reference_moe_experts",
    "Activation",
    "SwiGLU",
    "GptOssGLU",
    "GeGLU",
    "get_activation",
    "RoutingPlan",
    "plan_routing",
    "ENV_VAR",
    "KNOWN_BACKENDS",
]
