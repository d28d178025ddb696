"""Attention layer: holds one layer's KV cache (when its backend keeps one) and calls its backend."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from carpool.attention.backend import AttentionBackend
from carpool.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from carpool.layers.linear import QKVParallelLinear


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.backend = backend
        # Bound by the model runner once KV memory is allocated: [num_blocks, block_size, Hkv, D].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        backend.init_layer(self)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cos_sin_cache: torch.Tensor, batch: ForwardBatch, q_norm_weight: torch.Tensor | None = None,
                k_norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] as projected -> [T, Hq, D]; RoPE (after the optional per-head
        q/k RMSNorm) is applied here, with the KV-cache store where the backend keeps a cache."""
        return self.backend.forward(self, positions, q, k, v, cos_sin_cache, batch.attn, q_norm_weight,
                                    k_norm_weight, eps)

    def fused_qkv_forward(self, qkv_proj: "QKVParallelLinear", hidden: torch.Tensor, positions: torch.Tensor,
                          cos_sin_cache: torch.Tensor, batch: ForwardBatch) -> torch.Tensor | None:
        """Projection, RoPE, store and attention with the projection's fused kernel (batch-1 GPU steps of
        models without a q/k norm); None when it does not apply."""
        return self.backend.fused_qkv_forward(self, qkv_proj, hidden, positions, cos_sin_cache, batch.attn)
