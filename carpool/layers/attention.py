"""Attention layer: holds one layer's KV cache and calls the backend's paged attention op."""

from __future__ import annotations

import torch
from torch import nn

from carpool.forward_batch import ForwardBatch
from carpool.ops import KernelOps


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, ops: KernelOps) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.ops = ops
        # Bound by the model runner once KV memory is allocated: [num_blocks, block_size, Hkv, D].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        return self.ops.paged_attention(q, k, v, self.k_cache, self.v_cache, batch.attn, self.scale)
