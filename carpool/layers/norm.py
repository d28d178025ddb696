"""RMSNorm, with the residual add fused in when a residual is given. Under tensor parallelism the
reduction of the partial sums before it is the communicator's (distributed/communicator.py), which
calls this norm or fuses all three steps in one kernel."""

from __future__ import annotations

import torch
from torch import nn

from carpool.ops import KernelOps


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: KernelOps, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.ops = ops
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """rms_norm(x), or with a residual (rms_norm(x + residual), x + residual)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
