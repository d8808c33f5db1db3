"""Qwen3-VL-MoE, text path: the language model's experts and routers; the vision tower is left alone."""

from .spec import ArchSpec

SPEC = ArchSpec(model_type="qwen3_vl_moe", text_config="text_config", auto_class="AutoModelForImageTextToText")
