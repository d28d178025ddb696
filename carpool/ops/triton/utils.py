"""Output allocation for the Triton ops, behind one function so tests can poison it."""

from __future__ import annotations

import torch


def empty_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str
                 ) -> torch.Tensor:
    """Uninitialized output; every element must be written by a kernel (tests fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)
