"""Causal attention without a KV cache: the training backend.

Tokens arrive packed as `batch_size` sequences of `seq_len` tokens (DenseAttentionMetadata); each attends
causally within its own sequence through `scaled_dot_product_attention` (flash or memory-efficient
kernels on GPUs), so autograd and activation checkpointing work as for any PyTorch module. RoPE and the
optional per-head q/k norm are the torch_ref functions, which match transformers exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from carpool.attention.backend import AttentionBackend
from carpool.forward_batch import AttentionMetadata, DenseAttentionMetadata, ForwardBatch

if TYPE_CHECKING:
    from carpool.layers.attention import Attention
    from carpool.worker.input_batch import StepInputs


def dense_batch(input_ids: torch.Tensor) -> ForwardBatch:
    """A ForwardBatch of [B, T] token ids for the dense backend: packed row after row, positions 0..T-1."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, seq_len], got shape {tuple(input_ids.shape)}")
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device).repeat(b)
    return ForwardBatch(input_ids=input_ids.reshape(-1), positions=positions,
                        attn=DenseAttentionMetadata(batch_size=b, seq_len=t))


class DenseCausalAttentionBackend(AttentionBackend):
    name = "dense"

    def build_metadata(self, inputs: "StepInputs", device: torch.device) -> AttentionMetadata:
        raise NotImplementedError("the dense backend runs whole sequences (dense_batch), not scheduler steps")

    def forward(self, layer: "Attention", positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, cos_sin_cache: torch.Tensor, meta: DenseAttentionMetadata,
                q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        from carpool.ops.torch_ref.elementwise import qk_norm_rotary, rotary_embedding

        if q_norm_weight is not None:
            assert k_norm_weight is not None
            q, k = qk_norm_rotary(positions, q, k, cos_sin_cache, q_norm_weight, k_norm_weight, eps)
        else:
            q, k = rotary_embedding(positions, q, k, cos_sin_cache)
        b, t = meta.batch_size, meta.seq_len

        def heads_first(x: torch.Tensor) -> torch.Tensor:  # [B*T, H, D] -> [B, H, T, D]
            return x.view(b, t, x.shape[1], x.shape[2]).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=layer.scale,
            enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(b * t, q.shape[1], q.shape[2])
