"""Mixtral (8x7B, 8x22B): router `mlp.gate`, top-2 softmax, every layer sparse."""

from .spec import ArchSpec

SPEC = ArchSpec(model_type="mixtral")
