"""RMSNorm, with the residual add fused in when a residual is given. Under tensor parallelism the
reduction of the partial sums before it is the communicator's (distributed/communicator.py), which
calls this norm or fuses all three steps in one kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from carpool.layers.linear_method import QuantizedActivation
from carpool.ops import KernelOps

if TYPE_CHECKING:
    from carpool.ops.triton.quant_gemm import Fp8ActivationPlan


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

    def forward_fp8(self, x: torch.Tensor, residual: torch.Tensor | None, fp8_plan: Fp8ActivationPlan
                    ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
        """(normed, x + residual, or x without a residual): the norm written as the FP8 activations
        fp8_plan (the next layer's input quantization) asks for, in the same pass, where the backend has
        a kernel for it and x is [T, hidden]; else the model-dtype norm."""
        if self.ops.rms_norm_fp8 is None or x.dim() != 2 or x.stride(1) != 1 or self.weight.dtype != x.dtype:
            if residual is None:
                return self(x), x
            return self(x, residual)
        values, scale, res_out = self.ops.rms_norm_fp8(x, residual, self.weight, self.eps, fp8_plan.group_size,
                                                       fp8_plan.static_scale, fp8_plan.rows)
        return QuantizedActivation(values, scale, x.shape[0], fp8_plan), x if res_out is None else res_out
