"""OLMoE (OLMoE-1B-7B): softmax router `mlp.gate`, every layer sparse."""

from .spec import ArchSpec

SPEC = ArchSpec(model_type="olmoe")
