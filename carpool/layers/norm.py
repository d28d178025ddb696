"""RMSNorm, with the residual add fused in when a residual is given (and, under tensor parallelism, the
all-reduce of the row-parallel projection before it: see `tp`)."""

from __future__ import annotations

import torch
from torch import nn

from carpool.distributed import SINGLE, TPGroup
from carpool.ops import KernelOps


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: KernelOps, dtype: torch.dtype = torch.float32,
                 tp: TPGroup = SINGLE) -> None:
        """tp: the x passed with a residual is this rank's partial sum (a RowParallelLinear built with
        reduce_results=False); it is all-reduced over tp first, fused with the add and the norm."""
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.tp = tp
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        if self.tp.size > 1:
            return self.tp.all_reduce_add_rms_norm(x, residual, self.weight, self.eps, self.ops)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
