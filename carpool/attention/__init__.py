"""Attention backends: one interface (`AttentionBackend`), one implementation per way of running attention.

- `PagedAttentionBackend` (torch_ref kernels): inference over the paged KV cache, the CPU path and the
  oracle of the others;
- `TritonAttentionBackend`: the same on GPUs, with CUDA-graph capture and per-replay planning;
- `DenseCausalAttentionBackend`: training (no KV cache, causal attention within each sequence).

Layers call only the interface; the model runner picks the backend (`get_attention_backend`) and the
CUDA graph runner talks to it for capture and replay.
"""

from carpool.attention.backend import AttentionBackend, GraphBuffers, get_attention_backend
from carpool.attention.dense import DenseCausalAttentionBackend, dense_batch
from carpool.attention.paged import PagedAttentionBackend

__all__ = ["AttentionBackend", "DenseCausalAttentionBackend", "GraphBuffers", "PagedAttentionBackend",
           "dense_batch", "get_attention_backend"]
