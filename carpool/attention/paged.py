"""Paged attention over the KV cache with the torch_ref kernels (the CPU path and the oracle)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from carpool.attention.backend import AttentionBackend
from carpool.forward_batch import AttentionMetadata
from carpool.platform import to_device

if TYPE_CHECKING:
    from carpool.layers.attention import Attention
    from carpool.layers.linear import QKVParallelLinear
    from carpool.worker.input_batch import StepInputs


class PagedAttentionBackend(AttentionBackend):
    """Keys and values are stored at each token's slot (`slot_mapping`) as RoPE is applied; attention then
    reads every request's context through its block table."""

    name = "torch"

    def __init__(self) -> None:
        from carpool.ops import torch_ref

        self.rope_and_store_kv: Callable[..., torch.Tensor] = torch_ref.rope_and_store_kv
        self.paged_attention: Callable[..., torch.Tensor] = torch_ref.paged_attention

    def _metadata_fields(self, inputs: "StepInputs", device: torch.device) -> dict:
        def put(a: np.ndarray) -> torch.Tensor:
            return to_device(a, device)

        return dict(query_start_loc=put(inputs.query_start_loc), seq_lens=put(inputs.seq_lens),
                    block_tables=put(inputs.block_tables), slot_mapping=put(inputs.slot_mapping),
                    max_query_len=inputs.max_query_len, max_seq_len=inputs.max_seq_len,
                    query_start_loc_cpu=inputs.query_start_loc.tolist(), seq_lens_cpu=inputs.seq_lens.tolist())

    def build_metadata(self, inputs: "StepInputs", device: torch.device) -> AttentionMetadata:
        return AttentionMetadata(**self._metadata_fields(inputs, device))

    def forward(self, layer: "Attention", positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, cos_sin_cache: torch.Tensor, meta: AttentionMetadata,
                q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        # RoPE and the KV-cache store in one op; attention then reads this step's k and v from the cache.
        q = self.rope_and_store_kv(positions, q, k, v, cos_sin_cache, layer.k_cache, layer.v_cache,
                                   meta.slot_mapping, q_norm_weight, k_norm_weight, eps)
        return self.paged_attention(q, None, None, layer.k_cache, layer.v_cache, meta, layer.scale)

    def fused_qkv_forward(self, layer: "Attention", qkv_proj: "QKVParallelLinear", hidden: torch.Tensor,
                          positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: AttentionMetadata
                          ) -> torch.Tensor | None:
        q = qkv_proj.rope_and_store_kv(hidden, positions, cos_sin_cache, layer.k_cache, layer.v_cache,
                                       meta.slot_mapping)
        if q is None:
            return None
        return self.paged_attention(q, None, None, layer.k_cache, layer.v_cache, meta, layer.scale)
