"""GLM-4.7-Flash (glm4_moe_lite): MLA attention, DeepSeek-style sigmoid router, shared experts."""

from .spec import MLA_TARGETS, ArchSpec

SPEC = ArchSpec(model_type="glm4_moe_lite", attention_targets=MLA_TARGETS)
