"""The tensor-parallel group a layer belongs to: its rank, its size, and the two collectives the model
needs. Passed to layers explicitly; with size 1 every collective is a no-op and torch.distributed is
never touched.

All-reduces go through the one-shot symmetric-memory kernel (carpool/custom_all_reduce.py) when the
group has one and the tensor is eligible (small, the model dtype), through NCCL (or gloo on CPU)
otherwise. Either way the result is the return value: callers must not rely on x being reduced in place.
The all-reduce that feeds a residual add + RMSNorm has its own entry (all_reduce_add_rms_norm), which
fuses the three into one kernel on the symmetric-memory path. On batch-1 steps the row-parallel GEMV can
instead push its outputs to every rank as it computes them (push_gemv), and that norm only receives them;
the vocab-parallel embedding and LM head push the same way (push_embedding, push_logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from carpool.custom_all_reduce import CustomAllReduce, PushExchange
    from carpool.ops import KernelOps


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

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                ops: "KernelOps") -> tuple[torch.Tensor, torch.Tensor]:
        """ops.fused_add_rms_norm(all_reduce(x), residual, ...): one kernel on the symmetric-memory path
        (Triton kernels, an eligible shape), the two steps otherwise."""
        push, custom = self._push(), self.custom_all_reduce
        if push is not None and push.pending is not None:
            return push.add_rms_norm(x, residual, weight, eps)
        if self.size > 1 and custom is not None and ops.name == "triton" and custom.norm_eligible(x, residual):
            return custom.all_reduce_add_rms_norm(x, residual, weight, eps)
        return ops.fused_add_rms_norm(self.all_reduce(x), residual, weight, eps)

    def _push(self) -> "PushExchange | None":
        """The batch-1 push exchange, when this group has one."""
        custom = self.custom_all_reduce
        return custom.push if self.size > 1 and custom is not None else None

    def push_gemv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """x @ weight.T (this rank's partial sums), sent to every rank as it is computed, for the next
        all_reduce_add_rms_norm to receive; None when the push exchange does not take x (then compute
        and reduce as usual). Only for a row-parallel projection whose output goes to that norm."""
        push = self._push()
        return push.gemv(x, weight) if push is not None and push.eligible(x, weight) else None

    def push_embedding(self, token_id: torch.Tensor, weight: torch.Tensor, vocab_start: int
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One token's vocab-parallel embedding (this rank's share, sent to every rank as it is read) and
        a zero residual, for the first layer's norm to sum; None when the push exchange does not take it
        (then the embedding all-reduces as usual)."""
        push = self._push()
        return push.embedding(token_id, weight, vocab_start) if push is not None else None

    def begin_forward(self) -> None:
        """Before each forward (eager, or a CUDA graph replay): the push exchange's per-forward state."""
        push = self._push()
        if push is not None:
            push.begin_forward()

    def push_logits(self, hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """A one-row step's vocab-parallel logits, hidden @ weight.T on every rank, gathered by the push
        exchange (every rank's slice side by side, as all_gather_last_dim) and cut to `vocab`; None when
        it does not take them (then compute and all-gather as usual). The gather also takes their argmax
        in passing: `take_greedy_tokens` hands it to the sampler."""
        push = self._push()
        return push.gather_logits(hidden, weight, vocab) if push is not None else None

    def take_greedy_tokens(self) -> torch.Tensor | None:
        """The argmax of the logits gathered by push since the last call ([1] int64 on the device), or
        None; clears it. Why: a greedy step's token is then ready when the logits are, without a sampling
        pass over them (ModelRunner takes it right after each forward, and after each graph capture)."""
        push = self._push()
        if push is None:
            return None
        greedy, push.greedy = push.greedy, None
        return greedy

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
