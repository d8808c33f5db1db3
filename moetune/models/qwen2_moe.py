"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): softmax router plus a sigmoid-gated shared expert."""

from .spec import ArchSpec

SPEC = ArchSpec(model_type="qwen2_moe", router_modules=("mlp.gate", "mlp.shared_expert_gate"))
