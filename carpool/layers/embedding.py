"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from carpool.distributed import SINGLE_RANK, Communicator, PartialSums
from carpool.layers.linear import load_narrow, loaded_shape
from carpool.utils import cdiv


def vocab_shard_size(vocab_size: int, tp_size: int) -> int:
    """Rows of each rank's vocab slice: the vocab split evenly, the last slice padded with zero rows, and
    under TP an even count (the push exchange moves one-row logits in pairs: PushExchange.gather_logits)."""
    if tp_size == 1:
        return vocab_size
    shard = cdiv(vocab_size, tp_size)
    return shard + shard % 2


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 comm: Communicator = SINGLE_RANK) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.shard_size = vocab_shard_size(vocab_size, comm.size)
        self.vocab_start = comm.rank * self.shard_size
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        rows = max(0, min(self.shard_size, loaded_shape(loaded)[0] - self.vocab_start))
        if rows:
            param.data[:rows].copy_(load_narrow(loaded, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> PartialSums:
        """This rank's share of the embedding rows (zeros for tokens outside its vocab slice): partial
        sums that the first layer's norm reduces. A one-token step under TP may push them instead."""
        if self.comm.size == 1:
            return PartialSums(nn.functional.embedding(input_ids, self.weight), reduced=True)
        pushed = self.comm.push_embedding(input_ids, self.weight, self.vocab_start)
        if pushed is not None:
            return pushed
        local = input_ids - self.vocab_start
        mask = (local >= 0) & (local < self.shard_size)
        out = nn.functional.embedding(local.clamp(0, self.shard_size - 1), self.weight)
        return PartialSums(out * mask.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h W^T over this rank's vocab slice, gathered across ranks and cut to the real vocab."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 comm: Communicator = SINGLE_RANK, gemv: Callable[..., torch.Tensor] | None = None) -> None:
        """gemv: the backend's GEMV for one-row steps (the head is a batch-1 step's largest weight read,
        and the GEMV launches under PDL where cuBLAS does not); None: plain matmul."""
        super().__init__(vocab_size, hidden_size, dtype, comm)
        self.gemv = gemv

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.comm.gather_logits(hidden, self.weight, self.vocab_size, self.gemv)
