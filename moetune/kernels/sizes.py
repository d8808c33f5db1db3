"""Launch arithmetic in plain Python.

triton.cdiv and triton.next_power_of_2 are @jit functions in recent Triton: called from Python each
goes through JITFunction.__call__ (~5 us), and a MoE block makes dozens of such calls per step.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
