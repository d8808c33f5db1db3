"""Architectures as data (one ArchSpec per model_type) and the hook into transformers' experts dispatch."""

from .hook import IMPLEMENTATION, add_expert_lora, expert_lora, find_experts, install, uninstall
from .registry import REGISTRY, SUPPORTED_MODEL_TYPES, get_spec
from .spec import ArchSpec

__all__ = [
    "ArchSpec",
    "REGISTRY",
    "SUPPORTED_MODEL_TYPES",
    "get_spec",
    "install",
    "uninstall",
    "find_experts",
    "add_expert_lora",
    "expert_lora",
    "IMPLEMENTATION",
]
