"""Small helpers shared across the package."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b, in integers."""
    return -(-a // b)
