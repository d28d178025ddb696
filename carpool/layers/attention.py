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

    def rope_and_store_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos_sin_cache: torch.Tensor, batch: ForwardBatch, q_norm_weight: torch.Tensor | None,
                          k_norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """Rotate q (returned) and k, and write k and v into this layer's cache at the step's slots."""
        return self.ops.rope_and_store_kv(positions, q, k, v, cos_sin_cache, self.k_cache, self.v_cache,
                                          batch.attn.slot_mapping, q_norm_weight, k_norm_weight, eps)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                batch: ForwardBatch) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] or None when already stored -> [T, Hq, D]."""
        return self.ops.paged_attention(q, k, v, self.k_cache, self.v_cache, batch.attn, self.scale)
