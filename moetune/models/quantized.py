"""Checkpoints whose experts ship quantized, loaded as moetune trains them: dequantized to the model's dtype.

gpt-oss ships its experts in MXFP4 (`quantization_config.quant_method == "mxfp4"`). transformers keeps them so only
where its Hub kernels run (a GPU, the `kernels` package, the Hub), and otherwise fails to load offline; moetune
trains LoRA on a frozen base through its own grouped GEMMs, which read bf16/fp16 weights, so it asks transformers
to dequantize them on load (as Unsloth does): 2 bytes a weight instead of ~0.5 (gpt-oss-20b: ~42 GB). A
quantization_config the caller passes wins.

Fine-grained FP8 checkpoints (quant_method "fp8": DeepSeek-V3, Qwen3-30B-A3B-FP8) transformers dequantizes itself
only where FP8 kernels cannot run (a CPU, a GPU below sm89); on an H100 it keeps FP8 weights and FP8Experts, whose
weights moetune's grouped GEMMs do not read. So they are dequantized on load too (1 byte a weight becomes 2), the
checkpoint's own settings (block size, modules it left unquantized) kept.
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
    method = str(_quant_method(config)).lower()
    if "quantization_config" in kwargs:
        return kwargs
    if method.endswith("mxfp4"):
        from transformers import Mxfp4Config

        return {**kwargs, "quantization_config": Mxfp4Config(dequantize=True)}
    if method == "fp8":
        from transformers import FineGrainedFP8Config

        saved = config.quantization_config
        saved = saved if isinstance(saved, dict) else saved.to_dict()
        # from_pretrained keeps the checkpoint's config and takes only the loading attributes (dequantize and
        # modules_to_not_convert) from this one: the checkpoint's list is passed back so it is not replaced by None.
        return {**kwargs, "quantization_config": FineGrainedFP8Config(
            dequantize=True, modules_to_not_convert=saved.get("modules_to_not_convert"))}
    return kwargs
