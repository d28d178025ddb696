"""The tensor-parallel process group: this rank, the group size, and the plain collectives.

With size 1 every collective is a no-op and torch.distributed is never touched. All-reduces go through
the one-shot symmetric-memory kernel (distributed/symmetric.py) when the group has one and the tensor is
eligible (small, the model dtype), through NCCL (or gloo on CPU) otherwise. Either way the result is the
return value: callers must not rely on x being reduced in place. What the model asks of the group (a
reduction fused with the next norm, the batch-1 push exchange) is the Communicator's
(distributed/communicator.py); this module knows no kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from carpool.distributed.symmetric import CustomAllReduce


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
        """The ranks' x side by side along the last dim. One gather into one tensor (the ranks' x one
        after the other along dim 0): a list of outputs costs NCCL a copy out per rank, and then the cat;
        with one row (a batch-1 step's logits) the gathered tensor already is the result, no copy follows."""
        if self.size == 1:
            return x
        x = x.contiguous()
        gather = getattr(torch.distributed, "all_gather_single", None)  # (its newer name)
        if gather is None and x.device.type == "cpu":  # an older gloo gathers into lists only
            parts = [torch.empty_like(x) for _ in range(self.size)]
            torch.distributed.all_gather(parts, x)
            return torch.cat(parts, dim=-1)
        gathered = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        (gather or torch.distributed.all_gather_into_tensor)(gathered, x)
        # (a view when x has one row: the reshape copies only when rows interleave)
        stacked = gathered.view(self.size, *x.shape)
        return stacked.movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])


SINGLE = TPGroup()
