"""Checkpoints whose experts ship quantized, loaded as moetune trains them: dequantized to the model's dtype.

gpt-oss ships its experts in MXFP4 (`quantization_config.quant_method == "mxfp4"`). transformers keeps them so only
where its Hub kernels run (a GPU, the `kernels` package, the Hub), and otherwise fails to load offline; moetune
trains LoRA on a frozen base through its own grouped GEMMs, which read bf16/fp16 weights, so it asks transformers
to dequantize them on load (as Unsloth does): 2 bytes a weight instead of ~0.5 (gpt-oss-20b: ~42 GB). A
quantization_config the caller passes wins. FP8 checkpoints (DeepSeek-V3) transformers dequantizes itself where
FP8 kernels cannot run.
"""

from __future__ import annotations


def _quant_method(config) -> str | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    if isinstance(quantization, dict):
        return quantization.get("quant_method")
    return getattr(quantization, "quant_method", None)


def dequantizing_kwargs(config, kwargs: dict) -> dict:
    """kwargs for transformers' from_pretrained with the experts' dequantization asked for where the checkpoint
    needs it (MXFP4) and the caller did not choose."""
    method = _quant_method(config)
    if str(method).lower().endswith("mxfp4") and "quantization_config" not in kwargs:
        from transformers import Mxfp4Config

        return {**kwargs, "quantization_config": Mxfp4Config(dequantize=True)}
    return kwargs
