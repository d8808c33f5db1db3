"""One-line checks of the grouped kernels' operands, before a launch that would read or write out of bounds.

The kernels index the 1-D operands (per-row indices and scales, per-expert offsets and counts) as `ptr + i`, so
those must be contiguous; every length is checked against the one the kernel assumes. Plain attribute reads,
kept lean because the 4K-token block is host-bound: 3.3 us a grouped_gemm launch on the 2-core CI machine.
"""

from __future__ import annotations

import torch


def check_vector(name: str, t: torch.Tensor | None, length: int) -> None:
    """A 1-D operand of `length` elements the kernel reads as ptr + i (None: not given)."""
    if t is not None and (t.shape != (length,) or (length > 1 and t.stride(0) != 1)):
        raise ValueError(f"{name}: expected a contiguous 1-D tensor of {length} elements, got shape "
                         f"{list(t.shape)} strides {list(t.stride())}")


def check_rows(name: str, t: torch.Tensor, rows: int, columns: int = 0, dtype: torch.dtype | None = None) -> None:
    """A 2-D operand read as [rows, columns] (at least that many of each), in dtype where one is given."""
    shape = t.shape
    if len(shape) != 2 or shape[0] < rows or shape[1] < columns or (dtype is not None and t.dtype != dtype):
        kind = "2-D tensor" if dtype is None else f"2-D {dtype} tensor"
        wanted = f"at least [{rows}, {columns}]" if columns else f"at least {rows} rows"
        raise ValueError(f"{name}: expected a {kind} of {wanted}, got {t.dtype} {list(shape)}")
