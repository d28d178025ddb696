"""SiLU-and-mul: the gated activation of Llama-family MLPs, on a fused [gate | up] input."""

from __future__ import annotations

import torch
from torch import nn

from carpool.ops import KernelOps


class SiluAndMul(nn.Module):
    def __init__(self, ops: KernelOps) -> None:
        super().__init__()
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.silu_and_mul(x)
