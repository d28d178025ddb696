"""Quantized linear layers and the FP8 KV cache in plain PyTorch: the CPU path of every quantization
method, and the oracle of each quantized Triton kernel (ops/triton/quant_*.py).

Weights are dequantized, then multiplied: on CPU that is the whole method (a quantized checkpoint then
runs anywhere, and in float32 its tokens equal those of the same model with the dequantized weights
written back as a plain checkpoint). The W8A8 twin (`w8a8_linear`) emulates the FP8 GEMM in float32:
products of two e4m3 values are exact in float32, so only the summation order differs from the GPU.
"""

from __future__ import annotations

import torch

from carpool.forward_batch import AttentionMetadata
from carpool.ops.torch_ref.attention import paged_attention
from carpool.ops.torch_ref.elementwise import qk_norm_rotary, rotary_embedding
from carpool.quantization.formats import FP8_DTYPE, FP8_MAX, PACK, dequantize_fp8, unpack_int4

# Dynamic activation scales are max|x| / 448, floored so an all-zero row gets a finite scale.
MIN_ACT_AMAX = 1e-12


# --- int4 weight-only --------------------------------------------------------------------------------------

def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [N, K] of carpool's int4 layout (quantization/formats.py): (q - zero) * scale in float32,
    zero = 8 when `zeros` is None, returned in `dtype`."""
    q = unpack_int4(packed, 1).float()
    s = scales.float().repeat_interleave(group_size, 1)
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(group_size, 1)
    return ((q - z) * s).to(dtype)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) in x's dtype, W dequantized to x's dtype first (the CPU path)."""
    if packed.shape[1] * PACK != x.shape[-1]:
        raise ValueError(f"int4_linear: x has {x.shape[-1]} columns, the weight {packed.shape[1] * PACK}")
    w = dequantize_int4(packed, scales, zeros, group_size, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


# --- FP8 ---------------------------------------------------------------------------------------------------

def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               block_size: tuple[int, int] | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale).T (+ bias) in x's dtype, activations unquantized: the CPU path, and the twin of
    the FP8 weight GEMV (which reads e4m3 weights and multiplies in float32)."""
    w = dequantize_fp8(weight, weight_scale, block_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def quantize_fp8_activations(x: torch.Tensor, group_size: int | None = None,
                             static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x e4m3 [M, K], scale float32): with `static_scale` one scale for all ([1]); else per row ([M, 1],
    dynamic per token) or per row and group of `group_size` columns ([M, ceil(K / group_size)], the
    activation side of 128x128 block weights), each max |values| / 448."""
    xf = x.float()
    if static_scale is not None:
        scale = static_scale.float().reshape(1)
        return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    m, k = xf.shape
    g = k if group_size is None else group_size
    num_groups = -(-k // g)
    padded = torch.nn.functional.pad(xf, (0, num_groups * g - k)).view(m, num_groups, g)
    scale = padded.abs().amax(-1).clamp(min=MIN_ACT_AMAX) / FP8_MAX  # [M, groups]
    xq = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(m, -1)[:, :k]
    return xq.contiguous(), scale


def w8a8_linear(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                block_size: tuple[int, int] | None, out_dtype: torch.dtype,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 GEMM's result in float32 arithmetic, rounded to out_dtype: dequantized activations times
    dequantized weights. x_scale: [1] (static) or [M, 1] (per token) with per-channel weight scales
    [N]; [M, ceil(K / bk)] (per token and group of bk columns) with block weight scales."""
    m, k = xq.shape
    xs = x_scale.float()
    if block_size is not None:  # activation scales per row and group of block_size[1] columns
        xs = xs.repeat_interleave(block_size[1], 1)[:, :k]
    x = xq.float() * (xs if xs.dim() == 2 else xs.reshape(()))
    y = x @ dequantize_fp8(weight, weight_scale, block_size).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# --- FP8 KV cache ----------------------------------------------------------------------------------------------
# K and V are stored as e4m3 values of k / k_scale and v / v_scale (one scale per layer each) and read
# back as value * scale; with a model-dtype cache the scales are 1 and these equal the plain ops.

def quantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x as stored in a cache of `dtype`: divided by the scale and saturated to e4m3's range when the
    cache is FP8 (e4m3fn has no infinity: an overflow would become NaN), else cast."""
    if dtype != FP8_DTYPE:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def store_kvcache_fp8(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Write each token's K/V into its cache slot, quantized with the layer's scales. Slots < 0 (padding)
    are skipped."""
    num_heads, head_dim = k_cache.shape[-2:]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    for cache, x, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
        values = quantize_kv(x, scale, cache.dtype)
        if cache.dtype == FP8_DTYPE:  # index_copy_ has no e4m3 kernel on CPU: copy the bytes
            cache, values = cache.view(torch.uint8), values.view(torch.uint8)
        cache.view(-1, num_heads, head_dim).index_copy_(0, slot_mapping, values)


def rope_and_store_kv_fp8(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: float, v_scale: float,
                          q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                          eps: float = 0.0) -> torch.Tensor:
    """torch_ref.rope_and_store_kv with the rotated k and v stored through `quantize_kv`."""
    if q_weight is not None:
        assert k_weight is not None
        q, k = qk_norm_rotary(positions, q, k, cos_sin_cache, q_weight, k_weight, eps)
    else:
        q, k = rotary_embedding(positions, q, k, cos_sin_cache)
    store_kvcache_fp8(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def paged_attention_fp8(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, k_scale: float,
                        v_scale: float) -> torch.Tensor:
    """torch_ref.paged_attention over a cache holding k / k_scale and v / v_scale (e4m3 or any dtype):
    new keys and values are stored through `quantize_kv`, and all are read back in float32 times their
    scales."""
    if k is not None:
        assert v is not None
        store_kvcache_fp8(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
    return paged_attention(q, None, None, k_cache, v_cache, meta, scale, k_scale, v_scale)
