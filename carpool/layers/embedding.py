"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from carpool.distributed import SINGLE, TPGroup
from carpool.layers.linear import load_narrow, loaded_shape


def vocab_shard_size(vocab_size: int, tp_size: int) -> int:
    """Rows of each rank's vocab slice: the vocab split evenly, the last slice padded with zero rows, and
    under TP an even count (the push exchange moves one-row logits in pairs: PushExchange.gather_logits)."""
    if tp_size == 1:
        return vocab_size
    shard = -(-vocab_size // tp_size)
    return shard + shard % 2


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = vocab_shard_size(vocab_size, tp.size)
        self.vocab_start = tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        rows = max(0, min(self.shard_size, loaded_shape(loaded)[0] - self.vocab_start))
        if rows:
            param.data[:rows].copy_(load_narrow(loaded, 0, self.vocab_start, rows))

    def forward_with_residual(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, None), or on a one-token step under tensor parallelism with the push exchange this
        rank's share of the row, in flight to every rank, and a zero residual: the first layer's norm
        (which takes a residual) then sums the shares, so no all-reduce runs here."""
        if self.tp.size > 1 and input_ids.numel() == 1:
            pushed = self.tp.push_embedding(input_ids, self.weight, self.vocab_start)
            if pushed is not None:
                return pushed
        return self(input_ids), None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mask = (local >= 0) & (local < self.shard_size)
        out = nn.functional.embedding(local.clamp(0, self.shard_size - 1), self.weight)
        out = out * mask.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h W^T over this rank's vocab slice, gathered across ranks and cut to the real vocab."""

    # The backend's GEMV for one row (set by the ModelRunner, like LinearBase.gemv): a batch-1 step's
    # head is the step's largest weight read, and the GEMV launches under PDL where cuBLAS does not.
    gemv: Callable[..., torch.Tensor] | None = None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and hidden.dim() == 2 and hidden.shape[0] == 1:
            gathered = self.tp.push_logits(hidden, self.weight, self.vocab_size)  # under TP: pushed while computed
            if gathered is not None:
                return gathered
            logits = self.gemv(hidden, self.weight)
        else:
            logits = nn.functional.linear(hidden, self.weight)
        logits = self.tp.all_gather_last_dim(logits)
        return logits[..., :self.vocab_size]
