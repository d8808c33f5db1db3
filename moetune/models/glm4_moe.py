"""GLM-4.5 / GLM-4.6 (glm4_moe): sigmoid router with correction bias and group-limited top-k, shared experts."""

from .spec import ArchSpec

SPEC = ArchSpec(model_type="glm4_moe")
