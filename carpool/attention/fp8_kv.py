"""Paged attention over an FP8 (e4m3) KV cache: `--kv-cache-dtype fp8`.

The same backends as paged.py / triton_paged.py (metadata, CUDA graphs, plans), with the store and the
attention kernels that read and write e4m3 K and V through the layer's scales (ops/torch_ref/quant.py; the
Triton kernels take the scales and switch on the cache dtype, ops/triton/paged_kv.py): k is stored as
k / k_scale, v as v / v_scale, both saturated to e4m3's range.
A layer's scales are `layer.kv_scales` (k_scale, v_scale), Python floats fixed after loading (from the
checkpoint's k_scale / v_scale where it has them, registered as the layer's parameters by init_layer,
else 1.0), so captured graphs bake them in.

The batch-1 fused q/k/v GEMV (projection, RoPE and the store in one kernel) writes the model dtype only:
over an FP8 cache the projection and the RoPE + store run as two kernels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carpool.attention.paged import PagedAttentionBackend
from carpool.attention.triton_paged import TritonAttentionBackend
from carpool.layers.linear_method import set_weight_loader

if TYPE_CHECKING:
    from carpool.layers.attention import Attention
    from carpool.layers.linear import QKVParallelLinear

KV_CACHE_FP8_DTYPE = torch.float8_e4m3fn
DEFAULT_KV_SCALES = (1.0, 1.0)


def kv_scales(layer: "Attention") -> tuple[float, float]:
    """(k_scale, v_scale) of a layer; 1.0 each unless the checkpoint gave them."""
    return getattr(layer, "kv_scales", DEFAULT_KV_SCALES)


class _Fp8KVMixin:
    kv_cache_dtype = "fp8"
    checkpoint_scales = False  # the checkpoint has k_scale / v_scale per layer: load them

    def init_layer(self, layer: "Attention") -> None:
        if not self.checkpoint_scales:
            return
        for name in ("k_scale", "v_scale"):
            param = nn.Parameter(torch.ones(1, dtype=torch.float32), requires_grad=False)
            set_weight_loader(param, _load_scale)
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: "Attention") -> None:
        """The checkpoint's scales as the Python floats the kernels take (read once, before any graph)."""
        if not self.checkpoint_scales:
            return
        scales = (float(layer.k_scale), float(layer.v_scale))
        if not all(s > 0 and math.isfinite(s) for s in scales):
            raise ValueError(f"k_scale, v_scale: KV-cache scales must be positive and finite, got {scales}")
        layer.kv_scales = scales

    def forward(self, layer: "Attention", positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, cos_sin_cache: torch.Tensor, meta: Any, q_norm_weight: torch.Tensor | None,
                k_norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        k_scale, v_scale = kv_scales(layer)
        q = self.rope_and_store_kv(positions, q, k, v, cos_sin_cache, layer.k_cache, layer.v_cache,  # type: ignore
                                   meta.slot_mapping, q_weight=q_norm_weight, k_weight=k_norm_weight, eps=eps,
                                   k_scale=k_scale, v_scale=v_scale)
        return self.paged_attention(q, None, None, layer.k_cache, layer.v_cache, meta, layer.scale,  # type: ignore
                                    k_scale, v_scale)

    def fused_qkv_forward(self, layer: "Attention", qkv_proj: "QKVParallelLinear", hidden: torch.Tensor,
                          positions: torch.Tensor, cos_sin_cache: torch.Tensor, meta: Any) -> torch.Tensor | None:
        return None


def _load_scale(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    value = loaded if isinstance(loaded, torch.Tensor) else loaded[...]
    if value.numel() != 1:
        raise ValueError(f"a KV-cache scale is one value per layer, got shape {list(value.shape)}")
    param.data.copy_(value.float().reshape(1))


class Fp8PagedAttentionBackend(_Fp8KVMixin, PagedAttentionBackend):
    """The torch reference path over an FP8 cache."""

    def __init__(self, checkpoint_scales: bool = False) -> None:
        super().__init__()
        self.checkpoint_scales = checkpoint_scales
        from carpool.ops.torch_ref import quant

        self.rope_and_store_kv = quant.rope_and_store_kv_fp8
        self.paged_attention = quant.paged_attention_fp8


class Fp8TritonAttentionBackend(_Fp8KVMixin, TritonAttentionBackend):
    """The Triton kernels over an FP8 cache (decode split-K with cascade, prefill/extend): the model-dtype
    backend's own kernels, which switch on the cache's dtype."""

    def __init__(self, checkpoint_scales: bool = False, short_query_decode: bool = False) -> None:
        super().__init__(short_query_decode)
        self.checkpoint_scales = checkpoint_scales
