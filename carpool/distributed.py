"""The tensor-parallel group a layer belongs to: its rank, its size, and the two collectives the model
needs. Passed to layers explicitly; with size 1 every collective is a no-op and torch.distributed is
never touched.

All-reduces go through the one-shot symmetric-memory kernel (carpool/custom_all_reduce.py) when the
group has one and the tensor is eligible (small, the model dtype), through NCCL (or gloo on CPU)
otherwise. Either way the result is the return value: callers must not rely on x being reduced in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from carpool.custom_all_reduce import CustomAllReduce


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    custom_all_reduce: "CustomAllReduce | None" = field(default=None, compare=False, repr=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if self.custom_all_reduce is not None and self.custom_all_reduce.eligible(x):
            return self.custom_all_reduce.all_reduce(x)
        torch.distributed.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


SINGLE = TPGroup()
