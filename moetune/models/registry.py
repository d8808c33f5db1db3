"""model_type -> ArchSpec. Adding an architecture: one file beside this one and one line here."""

from __future__ import annotations

from . import deepseek_v3, glm4_moe, glm4_moe_lite, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe, qwen3_vl_moe
from .spec import ArchSpec

__all__ = ["REGISTRY", "SUPPORTED_MODEL_TYPES", "get_spec"]

REGISTRY: dict[str, ArchSpec] = {
    m.SPEC.model_type: m.SPEC
    for m in (qwen3_moe, qwen2_moe, olmoe, mixtral, gpt_oss, glm4_moe, glm4_moe_lite, deepseek_v3, qwen3_vl_moe)
}

SUPPORTED_MODEL_TYPES = tuple(sorted(REGISTRY))


def get_spec(model_type: str) -> ArchSpec:
    if model_type not in REGISTRY:
        raise ValueError(f"model_type: expected one of {', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
    return REGISTRY[model_type]
