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

Every model checkpoint moetune loads goes through from_pretrained_dequantized, which with strict=True (moetune train,
merge) also refuses one that lacks weights transformers would otherwise start at random (MissingWeights).
"""

from __future__ import annotations

import contextlib
import logging

import torch

# transformers 5.x logs a multi-line "LOAD REPORT" table (missing, unexpected, mismatched keys) as a warning of
# this logger at the end of from_pretrained.
_LOAD_REPORT_LOGGER = "transformers.modeling_utils"


def _quantization(config) -> dict:
    """The checkpoint's quantization_config as a dict (a config object's too), {} where there is none."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return {}
    return quantization if isinstance(quantization, dict) else quantization.to_dict()


def _dequantized_method(config) -> str | None:
    """"mxfp4" or "fp8" for a checkpoint whose experts moetune has dequantized on load, else None."""
    method = _quantization(config).get("quant_method")
    method = str(getattr(method, "value", method)).lower()  # (a QuantizationMethod enum on a config object)
    return method if method in ("mxfp4", "fp8") else None


def dequantizing_kwargs(config, kwargs: dict) -> dict:
    """kwargs for transformers' from_pretrained with the experts' dequantization asked for where the checkpoint
    needs it (MXFP4, FP8) and the caller did not choose."""
    method = _dequantized_method(config)
    if method is None or "quantization_config" in kwargs:
        return kwargs
    if method == "mxfp4":
        from transformers import Mxfp4Config

        return {**kwargs, "quantization_config": Mxfp4Config(dequantize=True)}
    from transformers import FineGrainedFP8Config

    # from_pretrained keeps the checkpoint's config and takes only the loading attributes (dequantize and
    # modules_to_not_convert) from this one: the checkpoint's list is passed back so it is not replaced by None.
    return {**kwargs, "quantization_config": FineGrainedFP8Config(
        dequantize=True, modules_to_not_convert=_quantization(config).get("modules_to_not_convert"))}


class MissingWeights(ValueError):
    """A checkpoint lacks weights its model has: transformers initialises those at random (with a warning), so a
    partial or damaged checkpoint would train, or merge, on random layers."""

    def __init__(self, argument: str, model_dir: str, keys: list[str]):
        self.model_dir, self.keys = model_dir, keys
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        super().__init__(f"{argument}: {model_dir} lacks {len(keys)} of the model's weights ({shown}), which would "
                         "start at random values: a partial or damaged checkpoint?")

    def naming(self, argument: str) -> "MissingWeights":
        """The same error, naming the caller's argument."""
        return MissingWeights(argument, self.model_dir, self.keys)


class _HeldRecords(logging.Filter):
    """Keeps a logger's records from its handlers until released, in order."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def drop_report(self) -> None:
        self.records = [record for record in self.records if "LOAD REPORT" not in record.getMessage()]


@contextlib.contextmanager
def _held_load_report():
    """Holds back what transformers' loading logs until the block ends, then passes it on (whatever the block
    raised), less the load report where the block dropped it: a refused checkpoint then reads as moetune's one-line
    error, not a table of keys above it, and a loaded one shows transformers' report as without moetune."""
    logger = logging.getLogger(_LOAD_REPORT_LOGGER)
    held = _HeldRecords()
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)
        for record in held.records:
            logger.handle(record)


def from_pretrained_dequantized(auto_class, model_dir: str, config, strict: bool = False, **kwargs):
    """auto_class.from_pretrained(model_dir, **kwargs) with a quantized checkpoint's experts dequantized
    (dequantizing_kwargs) and the result made plain where transformers 5.17-5.23 leave it half-quantized:

    - 5.17-5.22 dequantize MXFP4 experts to bf16 whatever `dtype` asks (5.23 passes the dtype through): the
      dequantized stacks are cast to the model's dtype (exact: bf16 holds every MXFP4 value);
    - 5.17-5.23 save a dequantized model through the quantizer's load conversions reversed (MXFP4 experts written
      under `gate_up_proj$` or `*_blocks` names, lost on reload; FP8 fails with "Undefined Operation"): the model
      forgets them, so save_pretrained writes the plain layout (transformers' default mapping for the architecture,
      as for a model built from its config).

    strict: raise MissingWeights where the checkpoint lacks any of the model's weights."""
    load_kwargs = dequantizing_kwargs(config, kwargs)
    if strict:
        with _held_load_report() as held:
            model, info = auto_class.from_pretrained(model_dir, output_loading_info=True, **load_kwargs)
            if info["missing_keys"]:
                held.drop_report()  # the one-line error says it; the table would only precede it
                raise MissingWeights("model_dir", model_dir, sorted(info["missing_keys"]))
    else:
        model = auto_class.from_pretrained(model_dir, **load_kwargs)
    # dequantized, by moetune's request or a caller's own config asking the same
    if _dequantized_method(config) is not None and not getattr(model, "is_quantized", False):
        dtype = kwargs.get("dtype")
        if not isinstance(dtype, torch.dtype):  # "auto" or unset: what the rest of the model was loaded in
            dtype = model.get_input_embeddings().weight.dtype
        for module in model.modules():
            for name in ("gate_up_proj", "down_proj"):
                weight = module._parameters.get(name)
                if weight is not None and weight.dim() == 3 and weight.is_floating_point() and weight.dtype != dtype:
                    weight.data = weight.data.to(dtype)
        model._weight_conversions = None
    return model
