"""DeepSeek-V3 / R1 / Kimi-K2 layout: MLA attention, sigmoid router with correction bias, shared experts."""

from .spec import ArchSpec

SPEC = ArchSpec(model_type="deepseek_v3")
