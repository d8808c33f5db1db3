"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): softmax router `mlp.gate`, optional dense layers."""

from .spec import ArchSpec

SPEC = ArchSpec(model_type="qwen3_moe")
