"""SiLU-and-mul: the gated activation of Llama-family MLPs, on a fused [gate | up] input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from carpool.layers.linear_method import QuantizedActivation
from carpool.ops import KernelOps

if TYPE_CHECKING:
    from carpool.ops.triton.quant_gemm import Fp8ActivationPlan


class SiluAndMul(nn.Module):
    def __init__(self, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor, fp8_plan: Fp8ActivationPlan | None = None
                ) -> torch.Tensor | QuantizedActivation:
        """silu(gate) * up; with fp8_plan (the next layer's input quantization) and a kernel for it, the
        result written as those FP8 activations in the same pass."""
        if fp8_plan is not None and self.ops.silu_and_mul_fp8 is not None and x.dim() == 2:
            values, scale = self.ops.silu_and_mul_fp8(x, fp8_plan.group_size, fp8_plan.static_scale, fp8_plan.rows)
            return QuantizedActivation(values, scale, x.shape[0], fp8_plan)
        return self.ops.silu_and_mul(x)
