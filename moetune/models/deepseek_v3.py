"""DeepSeek-V3 / R1 / Kimi-K2 layout: MLA attention, sigmoid router with correction bias, shared experts."""

from .spec import MLA_TARGETS, ArchSpec

SPEC = ArchSpec(model_type="deepseek_v3", attention_targets=MLA_TARGETS)
