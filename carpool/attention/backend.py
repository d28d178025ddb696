"""The attention backend interface: metadata preparation, forward, CUDA-graph capture and replay.

Invariant: for the same step, every backend's forward returns the same attention output (up to the
precision of its kernels); backends differ in how they store keys and values and plan their kernels,
never in what attention computes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from carpool.forward_batch import AttentionMetadata, DenseAttentionMetadata

if TYPE_CHECKING:
    from carpool.layers.attention import Attention
    from carpool.layers.linear import QKVParallelLinear
    from carpool.quantization.config import KVCacheScheme
    from carpool.worker.input_batch import StepInputs
    from carpool.worker.staging import Field


@dataclass(frozen=True)
class GraphBuffers:
    """The CUDA graph runner's static inputs that attention reads, sliced to a graph's batch size."""

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    backend_fields: dict[str, torch.Tensor]  # the backend's own (graph_fields), whole
    prefix_len: torch.Tensor  # [1] int32: the cascade's shared prefix, refilled per replay


class AttentionBackend(ABC):
    name: str = ""
    # What the KV cache stores: "auto" (the model dtype) or "fp8" (e4m3 with per-layer scales).
    kv_cache_dtype: str = "auto"
    # Whether decode steps can be captured in CUDA graphs (every value the kernels read is on the device).
    supports_cuda_graphs: bool = False

    # ---- the layers it serves ---------------------------------------------------------------------------
    def init_layer(self, layer: "Attention") -> None:
        """Register what this backend keeps on each attention layer (an FP8 cache's checkpoint scales)."""

    def process_weights_after_loading(self, layer: "Attention") -> None:
        """After the checkpoint is loaded: turn what init_layer registered into what forward reads."""

    # ---- metadata ----------------------------------------------------------------------------------
    @abstractmethod
    def build_metadata(self, inputs: "StepInputs", device: torch.device) -> AttentionMetadata:
        """The step's attention metadata on the device, from its host arrays."""

    # ---- forward -----------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, layer: "Attention", positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, cos_sin_cache: torch.Tensor, meta: Any, q_norm_weight: torch.Tensor | None,
                k_norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """Attention of the step: q [T, Hq, D], k and v [T, Hkv, D] as projected (before RoPE and the
        optional per-head q/k norm, which the backend applies) -> [T, Hq, D]."""

    def fused_qkv_forward(self, layer: "Attention", qkv_proj: "QKVParallelLinear", hidden: torch.Tensor,
                          positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: Any) -> torch.Tensor | None:
        """The projection, RoPE, the KV store and attention with the projection's fused kernel when it has
        one for this input (a batch-1 GPU step); None: the caller projects and calls forward."""
        return None

    # ---- CUDA graphs (backends with supports_cuda_graphs) ---------------------------------------------
    def graph_fields(self, max_batch_size: int) -> list["Field"]:
        """Static inputs of the backend's own that each replay refills (prepare_replay)."""
        return []

    def decode_rows(self, query_len: int) -> bool:
        """Whether steps whose longest query has query_len tokens run attention as one decode row per
        query token (attention/triton_paged.py as_decode_rows); a graph of them is captured over its
        tokens as decode rows."""
        return False

    def configure_graphs(self, batch_sizes: list[int], num_kv_heads: int) -> None:
        """Before capture: the batch sizes that get a graph and the model's KV heads per rank."""

    def graph_metadata(self, batch_size: int, buffers: GraphBuffers, cascade: bool, max_model_len: int,
                       query_len: int = 1) -> AttentionMetadata:
        """The metadata a graph of batch_size requests of query_len query tokens each is captured with
        (query_len > 1: a verification; buffers.query_start_loc is then i * query_len)."""
        raise NotImplementedError(f"attention backend {self.name!r} has no CUDA graphs")

    def prepare_replay(self, host: dict[str, np.ndarray], seq_lens: np.ndarray, batch_size: int) -> None:
        """Fill the backend's host fields for a replay of `batch_size` rows, the first len(seq_lens) real."""


def get_attention_backend(kernel_backend: str, kv_cache: "KVCacheScheme | None" = None,
                          short_query_decode: bool = False) -> AttentionBackend:
    """The inference backend of a kernel backend ('torch' | 'triton') over a KV cache in the model dtype
    (default) or FP8 (kv_cache.is_fp8: attention/fp8_kv.py). `short_query_decode`
    (KernelConfig.short_query_decode, Triton only): steps of 2-16 query tokens per request run attention
    as decode rows (attention/triton_paged.py)."""
    if kv_cache is not None and kv_cache.is_fp8 and kernel_backend in ("torch", "triton"):
        from carpool.attention.fp8_kv import Fp8PagedAttentionBackend, Fp8TritonAttentionBackend

        if kernel_backend == "torch":
            return Fp8PagedAttentionBackend(checkpoint_scales=kv_cache.checkpoint_scales)
        return Fp8TritonAttentionBackend(kv_cache.checkpoint_scales, short_query_decode)
    if kernel_backend == "torch":
        from carpool.attention.paged import PagedAttentionBackend

        return PagedAttentionBackend()
    if kernel_backend == "triton":
        from carpool.attention.triton_paged import TritonAttentionBackend

        return TritonAttentionBackend(short_query_decode)
    raise ValueError(f"kernel backend: unknown {kernel_backend!r}; choose 'torch' or 'triton'")


__all__ = ["AttentionBackend", "DenseAttentionMetadata", "GraphBuffers", "get_attention_backend"]
