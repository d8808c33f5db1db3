"""What the router kernels' tests share: where they run, their dtypes and tolerances, the error measure."""

from __future__ import annotations

import pytest
import torch

from moetune.experts.backends import triton as triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    triton_backend.probe(DEVICE, 0 if DEVICE == "cuda" else None, torch.float32) is not None,
    reason="no Triton that can run here",
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Relative error (Frobenius) against float64 from the same rounded logits: fp32 a few ulps, else one rounding of
# the output (fp16 2^-11, bf16 2^-8).
RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def relative(got, ref):
    """Relative error (Frobenius); absolute where the reference is 0 up to float64 rounding (k = 1, normalised)."""
    scale = ref.double().norm().item()
    return (got.double() - ref.double()).norm().item() / (scale if scale > 1e-12 else 1.0)
