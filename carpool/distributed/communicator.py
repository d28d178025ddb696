"""The model's side of tensor parallelism: every exchange a layer needs, as explicit calls.

A decoder layer's data flow under Megatron-style TP: row-parallel projections (o_proj, down_proj, the
vocab-parallel embedding) leave each rank with *partial sums*; the next RMSNorm needs their sum. The
model states this in its code: a row-parallel projection returns `PartialSums`, and the decoder layer
hands them to `Communicator.reduce_add_rms_norm`, which reduces, adds the residual and normalizes in
whatever way this deployment can (one rank: just the norm; GPUs: one fused symmetric-memory kernel; a
batch-1 step: the push exchange, where the projection already sent its sums while computing them).

Invariants:
- Partial sums are reduced exactly once, by the call they are handed to. A pushed `PartialSums` can only
  be received by the norm call it is passed to, and the push exchange checks that it is the push made
  last (distributed/push_exchange.py): a norm can never receive another layer's sums.
- Which path a call takes depends only on shapes, dtypes and start-up agreements, equal on every rank,
  so the ranks always meet in the same collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.utils._pytree
from torch import nn

from carpool.config import KernelConfig
from carpool.distributed.group import SINGLE, TPGroup

if TYPE_CHECKING:
    from carpool.distributed.push_exchange import PushExchange
    from carpool.layers.linear_method import QuantizedActivation
    from carpool.layers.norm import RMSNorm
    from carpool.ops.triton.quant_gemm import Fp8ActivationPlan


@dataclass(frozen=True)
class PartialSums:
    """This rank's share of a row-parallel output, handed to the one call that reduces it.

    reduced: already the full sum (a projection that reduced itself, as one with a bias must).
    pushed: the push exchange carries the sums to every rank (a batch-1 step); only a norm may receive.
    """

    value: torch.Tensor
    reduced: bool = False
    pushed: bool = False


def _flatten_partial_sums(p: PartialSums) -> tuple[list[torch.Tensor], tuple[bool, bool]]:
    return [p.value], (p.reduced, p.pushed)


def _unflatten_partial_sums(values: Iterable[torch.Tensor], flags: tuple[bool, bool]) -> PartialSums:
    (value,) = values
    return PartialSums(value, *flags)


# A pytree node, so that code which finds a module's tensors with `tree_flatten` sees the one inside. A
# decoder layer returns its MLP output as PartialSums; FSDP2 up to torch 2.12 registers its pre-backward
# hook (which all-gathers the layer's weights again after a reshard) only on the output tensors that
# `tree_flatten` yields, and a dataclass that is not registered is one opaque leaf. The hook then sat on
# the residual alone, autograd ran down_proj's backward (created later, so first) before it, and read
# the freed weight: "setStorage: ... out of bounds for storage of size 0" (eager, reshard_after_forward).
torch.utils._pytree.register_pytree_node(PartialSums, _flatten_partial_sums, _unflatten_partial_sums,
                                         serialized_type_name="carpool.distributed.PartialSums")


class Communicator:
    """The tensor-parallel exchanges of one model replica. With one rank every call is local."""

    def __init__(self, group: TPGroup = SINGLE, kernels: KernelConfig | None = None) -> None:
        self.group = group
        self.kernels = kernels or KernelConfig()
        custom = group.custom_all_reduce if group.size > 1 else None
        # (start-up decided each path on every rank alike: distributed/startup.py)
        self._fused_norm = custom is not None and custom.exchange is not None
        self._push: PushExchange | None = custom.push if custom is not None else None

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def push_exchange(self) -> "PushExchange | None":
        return self._push

    # ---- plain collectives ------------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(x)

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_last_dim(x)

    def begin_forward(self) -> None:
        """Before each forward (eager, or a CUDA graph replay): the push exchange's per-forward state."""
        if self._push is not None:
            self._push.begin_forward()

    # ---- producers of partial sums --------------------------------------------------------------------
    def push_gemv(self, x: torch.Tensor, weight: torch.Tensor | None) -> PartialSums | None:
        """x @ weight.T (this rank's partial sums), sent to every rank as it is computed: a batch-1 step's
        row-parallel projection under TP. None when the push exchange does not take x (then the caller
        computes, and the norm reduces, as usual)."""
        push = self._push
        if push is None or weight is None or not push.eligible(x, weight):
            return None
        return PartialSums(push.gemv(x, weight), pushed=True)

    def push_embedding(self, token_id: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> PartialSums | None:
        """One token's vocab-parallel embedding row (this rank's share, pushed while read); None when the
        push exchange does not take it."""
        push = self._push
        if push is None or token_id.numel() != 1:
            return None
        pushed = push.embedding(token_id, weight, vocab_start)
        return None if pushed is None else PartialSums(pushed[0], pushed=True)

    # ---- the reduction, fused with the residual add and the norm ---------------------------------------
    def reduce_add_rms_norm(self, partial: PartialSums, residual: torch.Tensor | None, norm: "RMSNorm",
                            fp8_plan: "Fp8ActivationPlan | None" = None
                            ) -> tuple["torch.Tensor | QuantizedActivation", torch.Tensor]:
        """(norm(sum + residual), sum + residual) where sum is the partials reduced over the ranks; with no
        residual (the first layer) the sum itself is the residual stream. fp8_plan: the next layer's input
        quantization, which the norm may write its output as (RMSNorm.forward_fp8; not where the
        reduction and the norm are one kernel)."""
        x = partial.value
        if partial.pushed:
            push = self._push
            assert push is not None, "pushed partial sums without a push exchange"
            if residual is None:  # the embedding's push: the norm adds the shares to zeros
                assert push.zeros is not None
                residual = push.zeros[:, :x.shape[-1]]
            return push.add_rms_norm(x, residual, norm.weight, norm.eps)
        if self.size > 1 and not partial.reduced:
            if (residual is not None and self._fused_norm and norm.ops.name == "triton"
                    and self.group.custom_all_reduce.norm_eligible(x, residual)):  # type: ignore[union-attr]
                return self.group.custom_all_reduce.all_reduce_add_rms_norm(  # type: ignore[union-attr]
                    x, residual, norm.weight, norm.eps)
            x = self.all_reduce(x)
        if fp8_plan is not None:
            return norm.forward_fp8(x, residual, fp8_plan)
        if residual is None:
            return norm(x), x
        return norm(x, residual)

    # ---- the LM head's gather -------------------------------------------------------------------------
    def gather_logits(self, hidden: torch.Tensor, weight: torch.Tensor, vocab: int,
                      gemv: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """[T, vocab] logits from each rank's vocab slice of the head: pushed while computed for a one-row
        step when the push exchange takes it, else computed (`gemv` for one row when given) and
        all-gathered."""
        one_row = hidden.dim() == 2 and hidden.shape[0] == 1
        if one_row and gemv is not None:
            if self._push is not None:
                gathered = self._push.gather_logits(hidden, weight, vocab)
                if gathered is not None:
                    return gathered
            logits = gemv(hidden, weight)
        else:
            logits = nn.functional.linear(hidden, weight)
        logits = self.all_gather_last_dim(logits)
        return logits[..., :vocab]


SINGLE_RANK = Communicator()
