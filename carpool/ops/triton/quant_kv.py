"""The FP8 KV cache for the Triton backend: the KV store, RoPE + store, and the paged attention kernels
(split-K decode with cascade, prefill/extend) over a cache of e4m3 K and V with one scale per layer each.

A cache entry holds k / k_scale (and v / v_scale) saturated to e4m3's range; kernels read it back in the
query's dtype (16-bit, or float32 in CPU tests) and fold the scales in where they cost nothing: k_scale
into the softmax scale (q . (s k) = s (q . k)), v_scale into the normalized output (sum p (s v) = s sum
p v). The score and output tiles stay in the query's dtype on the tensor cores: only the cache bytes
halve, which is what decode attention (bandwidth-bound, about 73% of an offline step) pays for.

These are the kernels of ops/triton/{paged_kv, elementwise, decode_attention, prefill_attention,
attention}.py with three changes, so they also run a model-dtype cache (scales 1.0, same results):
the query is not converted to the cache dtype (`q.to(k_cache dtype)` there), K/V tiles are converted to
the query's dtype after loading (`attend_tile_scaled`), and stores divide by the scale and round to e4m3
(fp8.to_e4m3). The plans, split counts, scratch and merge kernel are theirs, imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from carpool.forward_batch import CASCADE_ALIGN, AttentionMetadata, TritonAttentionMetadata
from carpool.ops.triton import utils
from carpool.ops.triton.attention import _check_shapes, _count_single_queries, _eager_balance, decode_num_splits
from carpool.ops.triton.decode_attention import (
    DecodeConfig,
    _merge_kernel,
    _used_splits,
    decode_scratch,
    default_decode_config,
)
from carpool.ops.triton.elementwise import _check_rotary, _cos_sin, _rope_heads, _rotate_heads
from carpool.ops.triton.fp8 import to_e4m3
from carpool.ops.triton.paged_kv import slot_row
from carpool.ops.triton.prefill_attention import PrefillConfig, _num_tiles, default_prefill_config, prefill_plan
from carpool.ops.triton.utils import pdl_enter, pdl_release, pdl_wait

FP8_DTYPE = torch.float8_e4m3fn
LOG2E = 1.4426950408889634


def _is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_DTYPE


@triton.jit
def _store_value(x, scale, cache_ptr, IS_FP8: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr):
    """x as the cache at cache_ptr stores it: x / scale in e4m3, or x cast to a model-dtype cache."""
    if IS_FP8:
        return to_e4m3(x.to(tl.float32) / scale, cache_ptr, SOFTWARE_ROUNDING)
    return x.to(cache_ptr.dtype.element_ty)


# --- stores ------------------------------------------------------------------------------------------------

@triton.jit
def _store_kv_scaled_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, n_heads, k_scale, v_scale,
                            stride_kt, stride_kh, stride_vt, stride_vh,
                            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                            HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_D: tl.constexpr, IS_FP8: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr,
                            USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    page, row, n_heads = slot_row(slot_ptr, t, n_heads, PAGE_SIZE)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < n_heads) & (dims[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask, other=0.0)
    kc = k_cache_ptr + page * stride_kcb + row * stride_kcs + heads[:, None] * stride_kch + dims[None, :]
    vc = v_cache_ptr + page * stride_vcb + row * stride_vcs + heads[:, None] * stride_vch + dims[None, :]
    tl.store(kc, _store_value(k, k_scale, k_cache_ptr, IS_FP8, SOFTWARE_ROUNDING), mask=mask)
    tl.store(vc, _store_value(v, v_scale, v_cache_ptr, IS_FP8, SOFTWARE_ROUNDING), mask=mask)


def store_kvcache_scaled(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """paged_kv.store_kvcache into an FP8 (or model-dtype) cache: k / k_scale and v / v_scale."""
    n_tokens, n_heads, head_dim = k.shape
    if n_tokens == 0:
        return
    _store_kv_scaled_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, n_heads, float(k_scale), float(v_scale), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        IS_FP8=_is_fp8(k_cache), SOFTWARE_ROUNDING=utils.interpreting(), num_warps=4,
        USE_PDL=utils.pdl(), launch_pdl=utils.pdl())


@triton.jit
def _rope_store_kv_scaled_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, qw_ptr, kw_ptr, eps, slot_ptr,
                                 k_cache_ptr, v_cache_ptr, k_scale, v_scale, n_q_heads, n_k_heads, stride_qt,
                                 stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_kcb,
                                 stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, HALF: tl.constexpr,
                                 PAGE_SIZE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                                 BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr, IS_FP8: tl.constexpr,
                                 SOFTWARE_ROUNDING: tl.constexpr, USE_PDL: tl.constexpr):
    """elementwise._rope_store_kv_kernel, storing through _store_value."""
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, t, cos_sin_ptr, stride_cs, HALF, BLOCK_HALF)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < HALF
    _rotate_heads(q_ptr, t * stride_qt, stride_qh, n_q_heads, cos, sin, qw_ptr, eps, HALF, BLOCK_HQ, BLOCK_HALF,
                  HAS_NORM)
    y1, y2 = _rope_heads(k_ptr, t * stride_kt, stride_kh, n_k_heads, cos, sin, kw_ptr, eps, HALF, BLOCK_HK,
                         BLOCK_HALF, HAS_NORM)
    page, row, n_store = slot_row(slot_ptr, t, n_k_heads, PAGE_SIZE)
    heads = tl.arange(0, BLOCK_HK)
    mask = (heads[:, None] < n_store) & cmask[None, :]
    kc = k_cache_ptr + page * stride_kcb + row * stride_kcs + heads[:, None] * stride_kch + cols[None, :]
    tl.store(kc, _store_value(y1, k_scale, k_cache_ptr, IS_FP8, SOFTWARE_ROUNDING), mask=mask)
    tl.store(kc + HALF, _store_value(y2, k_scale, k_cache_ptr, IS_FP8, SOFTWARE_ROUNDING), mask=mask)
    vp = v_ptr + t * stride_vt + heads[:, None] * stride_vh + cols[None, :]
    vc = v_cache_ptr + page * stride_vcb + row * stride_vcs + heads[:, None] * stride_vch + cols[None, :]
    v1 = tl.load(vp, mask=mask, other=0.0)
    v2 = tl.load(vp + HALF, mask=mask, other=0.0)
    tl.store(vc, _store_value(v1, v_scale, v_cache_ptr, IS_FP8, SOFTWARE_ROUNDING), mask=mask)
    tl.store(vc + HALF, _store_value(v2, v_scale, v_cache_ptr, IS_FP8, SOFTWARE_ROUNDING), mask=mask)


def rope_and_store_kv_scaled(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0,
                             q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                             eps: float = 0.0) -> torch.Tensor:
    """elementwise.rope_and_store_kv (q rotated IN PLACE and returned) into an FP8 or model-dtype cache."""
    _check_rotary(q, k, cos_sin_cache)
    if v.shape != k.shape or v.stride(-1) != 1:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)} with a contiguous last dim, "
                         f"got {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache, v_cache: expected [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}], "
                         f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    n_tokens = q.shape[0]
    if n_tokens:
        half = q.shape[-1] // 2
        qw = q_weight if q_weight is not None else cos_sin_cache
        kw = k_weight if k_weight is not None else cos_sin_cache
        _rope_store_kv_scaled_kernel[(n_tokens,)](
            positions, q, k, v, cos_sin_cache, qw, kw, eps, slot_mapping, k_cache, v_cache, float(k_scale),
            float(v_scale), q.shape[1], k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), HALF=half,
            PAGE_SIZE=k_cache.shape[1], BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(half),
            HAS_NORM=q_weight is not None, IS_FP8=_is_fp8(k_cache), SOFTWARE_ROUNDING=utils.interpreting(),
            num_warps=4, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return q


# --- attention -----------------------------------------------------------------------------------------------

@triton.jit
def attend_tile_scaled(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_ptr, start_n, seq_len,
                       kv_head_off_k, kv_head_off_v, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
                       HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """paged_kv.attend_tile with K and V converted to q's dtype after loading (qk_scale carries k_scale;
    the caller multiplies the normalized output by v_scale)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if MASK == 0:
        key_ok = offs_n >= 0
    else:
        key_ok = offs_n < seq_len
    page = tl.load(bt_ptr + offs_n // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
    row = offs_n % PAGE_SIZE
    load_mask = key_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        load_mask = load_mask & (offs_d[None, :] < HEAD_DIM)
    k_ptrs = k_cache_ptr + kv_head_off_k + page[:, None] * stride_kb + row[:, None] * stride_ks
    k = tl.load(k_ptrs + offs_d[None, :], mask=load_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASK == 1:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    if MASK == 2:
        s = tl.where(key_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_ptrs = v_cache_ptr + kv_head_off_v + page[:, None] * stride_vb + row[:, None] * stride_vs
    v = tl.load(v_ptrs + offs_d[None, :], mask=load_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _load_q(ptrs, mask, k_cache_ptr, KV_FP8: tl.constexpr):
    """A query tile in the dtype the tiles are multiplied in: the cache's, or q's own over an FP8 cache."""
    q = tl.load(ptrs, mask=mask, other=0.0)
    if not KV_FP8:
        q = q.to(k_cache_ptr.dtype.element_ty)
    return q


@triton.jit
def _decode_scaled_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
                          out_ptr, part_out_ptr, part_lse_ptr, ctx_start_ptr, order_ptr, split_len_ptr, qk_scale,
                          v_scale, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                          stride_vh, stride_bt, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_lt,
                          stride_lh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          HAS_PREFIX: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_SPLIT_LEN: tl.constexpr,
                          KV_FP8: tl.constexpr, USE_PDL: tl.constexpr):
    """decode_attention._decode_kernel over a scaled cache (see the module docstring)."""
    pdl_release(USE_PDL)
    kv_head = tl.program_id(0) // NUM_SPLITS
    split = tl.program_id(0) % NUM_SPLITS
    req = tl.program_id(1)
    if HAS_ORDER:
        req = tl.load(order_ptr + req)
    q_row = tl.load(qsl_ptr + req)
    is_decode = tl.load(qsl_ptr + req + 1) - q_row == 1
    seq_len = tl.where(is_decode, tl.load(seq_lens_ptr + req), 0)
    first_tile = 0
    if HAS_PREFIX:
        first_tile = tl.load(ctx_start_ptr) // BLOCK_N
    num_tiles = tl.maximum(tl.cdiv(seq_len, BLOCK_N) - first_tile, 0)
    used_splits = _used_splits(num_tiles, split_len_ptr, NUM_SPLITS, MIN_SPLIT_TILES, BLOCK_N, HAS_SPLIT_LEN)
    tiles_per_split = tl.cdiv(num_tiles, used_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, first_tile + num_tiles)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    num_rows = tl.where(is_decode, GROUP, 0)
    active_rows = tl.where(split < used_splits, num_rows, 0)
    mask_d = offs_d[None, :] < HEAD_DIM
    q_row64 = q_row.to(tl.int64)
    bt_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_off_k = kv_head.to(tl.int64) * stride_kh
    kv_off_v = kv_head.to(tl.int64) * stride_vh
    pdl_wait(USE_PDL)

    q = _load_q(q_ptr + q_row64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                (offs_g < active_rows)[:, None] & mask_d, k_cache_ptr, KV_FP8)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        acc, l_i, m_i = attend_tile_scaled(acc, l_i, m_i, q, m_i, k_cache_ptr, v_cache_ptr, bt_ptr, tile * BLOCK_N,
                                           seq_len, kv_off_k, kv_off_v, stride_kb, stride_ks, stride_vb, stride_vs,
                                           qk_scale, HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, 1, DOT_PRECISION)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    if HAS_PREFIX:
        part_rows = num_rows
    else:
        out_rows = tl.where(used_splits == 1, active_rows, 0)
        tl.store(out_ptr + q_row64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=(offs_g < out_rows)[:, None] & mask_d)
        part_rows = active_rows - out_rows
    if NUM_SPLITS > 1 or HAS_PREFIX:
        req64 = req.to(tl.int64)
        part = part_out_ptr + req64 * stride_pt + heads[:, None] * stride_ph + split * stride_ps
        tl.store(part + offs_d[None, :], o, mask=(offs_g < part_rows)[:, None] & mask_d)
        lse = m_i + tl.log2(l_i)
        tl.store(part_lse_ptr + req64 * stride_lt + heads * stride_lh + split, lse, mask=offs_g < part_rows)


@triton.jit
def _prefix_scaled_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, qsl_ptr, prefix_len_ptr, part_out_ptr,
                          part_lse_ptr, num_reqs, qk_scale, v_scale, stride_qt, stride_qh, stride_kb, stride_ks,
                          stride_kh, stride_vb, stride_vs, stride_vh, stride_pt, stride_ph, stride_ps, stride_lt,
                          stride_lh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                          SLOT0: tl.constexpr, PREFIX_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          KV_FP8: tl.constexpr, USE_PDL: tl.constexpr):
    """decode_attention._prefix_kernel (cascade, shared prefix) over a scaled cache."""
    pdl_enter(USE_PDL)
    tile_m = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_len = tl.load(prefix_len_ptr)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    req = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    q_row = tl.load(qsl_ptr + req, mask=req < num_reqs, other=0)
    q_end = tl.load(qsl_ptr + req + 1, mask=req < num_reqs, other=0)
    row_ok = (req < num_reqs) & (q_end - q_row == 1)
    q_row = q_row.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_qd = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = _load_q(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask_qd,
                k_cache_ptr, KV_FP8)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    num_tiles = prefix_len // BLOCK_N
    tiles_per_split = tl.cdiv(num_tiles, PREFIX_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    for tile in range(tile_lo, tile_hi):
        acc, l_i, m_i = attend_tile_scaled(acc, l_i, m_i, q, m_i, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                           tile * BLOCK_N, prefix_len, kv_head.to(tl.int64) * stride_kh,
                                           kv_head.to(tl.int64) * stride_vh, stride_kb, stride_ks, stride_vb,
                                           stride_vs, qk_scale, HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, 0,
                                           DOT_PRECISION)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    req64 = req.to(tl.int64)
    slot = SLOT0 + split
    tl.store(part_out_ptr + req64[:, None] * stride_pt + head[:, None] * stride_ph + slot * stride_ps
             + offs_d[None, :], o, mask=mask_qd)
    tl.store(part_lse_ptr + req64 * stride_lt + head * stride_lh + slot, lse, mask=row_ok)


def fp8_decode_config(head_dim: int, q_dtype: torch.dtype) -> DecodeConfig:
    """The split kernel's launch over an FP8 cache: the bf16 tiles with 8 warps. Compiled for sm_90
    (scripts/quant_compile_check.py), the e4m3 -> bf16 conversions take 4 warps to 128 registers and
    a 16-byte spill; 8 warps take 102 and none. (Tiles stay at most CASCADE_ALIGN keys: the cascade's
    prefix ends on a tile boundary.) Unmeasured: benchmarks/bench_kernels.py can sweep it."""
    base = default_decode_config(head_dim, q_dtype)
    if q_dtype == torch.float32:
        return base
    return DecodeConfig(block_n=base.block_n, num_warps=8, num_stages=base.num_stages,
                        min_split_tiles=base.min_split_tiles)


def _precision(q: torch.Tensor, k_cache: torch.Tensor) -> str:
    compute = q.dtype if _is_fp8(k_cache) else k_cache.dtype
    return "ieee" if compute == torch.float32 else "tf32"


def decode_attention_scaled(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, num_splits: int, k_scale: float = 1.0, v_scale: float = 1.0,
                            config: DecodeConfig | None = None,
                            scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
                            prefix_len: torch.Tensor | None = None, prefix_splits: int = 8,
                            order: torch.Tensor | None = None, split_len: torch.Tensor | None = None) -> torch.Tensor:
    """decode_attention.decode_attention over a cache holding k / k_scale and v / v_scale."""
    num_reqs = seq_lens.shape[0]
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if num_reqs == 0 or num_tokens == 0:
        return out
    fp8 = _is_fp8(k_cache)
    config = config or (fp8_decode_config(head_dim, q.dtype) if fp8 else default_decode_config(head_dim, k_cache.dtype))
    cascade = prefix_len is not None
    num_slots = num_splits + (prefix_splits if cascade else 0)
    if num_slots > 1:
        part_out, part_lse = scratch if scratch is not None else decode_scratch(
            num_reqs, num_q_heads, num_slots, head_dim, q.device)
        if part_out.shape[0] < num_reqs or part_out.shape[2] < num_slots:
            raise ValueError(f"decode scratch: need >= [{num_reqs}, {num_q_heads}, {num_slots}, ...], "
                             f"got {tuple(part_out.shape)}")
    else:
        part_out, part_lse = out, out
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))
    precision = _precision(q, k_cache)
    qk_scale = scale * float(k_scale) * LOG2E
    ctx_start = prefix_len if cascade else seq_lens
    _decode_scaled_kernel[(num_kv_heads * num_splits, num_reqs)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_lse, ctx_start,
        seq_lens if order is None else order, seq_lens if split_len is None else split_len, qk_scale, float(v_scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, NUM_SPLITS=num_splits,
        MIN_SPLIT_TILES=config.min_split_tiles, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=config.block_n,
        DOT_PRECISION=precision, HAS_PREFIX=cascade, HAS_ORDER=order is not None,
        HAS_SPLIT_LEN=split_len is not None, KV_FP8=fp8, num_warps=config.num_warps,
        num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    if cascade:
        assert prefix_len is not None
        block_m = 64 if precision == "ieee" else 128
        _prefix_scaled_kernel[(triton.cdiv(num_reqs * group, block_m), num_kv_heads, prefix_splits)](
            q, k_cache, v_cache, block_tables, query_start_loc, prefix_len, part_out, part_lse, num_reqs, qk_scale,
            float(v_scale), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, SLOT0=num_splits, PREFIX_SPLITS=prefix_splits,
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=CASCADE_ALIGN, DOT_PRECISION=precision, KV_FP8=fp8,
            num_warps=8 if block_m == 128 else 4, num_stages=2, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    if num_slots > 1:
        _merge_kernel[(num_reqs, num_q_heads)](
            query_start_loc, seq_lens, seq_lens if split_len is None else split_len, part_out, part_lse, out,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            NUM_SLOTS=num_slots, MIN_SPLIT_TILES=config.min_split_tiles, BLOCK_N=config.block_n,
            HAS_PREFIX=cascade, HAS_SPLIT_LEN=split_len is not None, BLOCK_S=triton.next_power_of_2(num_slots),
            BLOCK_D=block_d, num_warps=4 if block_d >= 128 else 2, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


@triton.jit
def _prefill_scaled_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
                           tile_req_ptr, tile_q_ptr, out_ptr, qk_scale, v_scale,
                           stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                           stride_bt, stride_ot, stride_oh,
                           GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                           BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                           USE_PDL: tl.constexpr):
    """prefill_attention._prefill_kernel over a scaled cache."""
    pdl_enter(USE_PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(tile_req_ptr + tile)
    q_first = tl.load(tile_q_ptr + tile)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_start = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = q_first + offs_m // BLOCK_G
    g = offs_m % BLOCK_G
    row_ok = (tok < q_len) & (g < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    mask_qd = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = (q_start + tok).to(tl.int64)
    heads = kv_head * GROUP + g
    q = _load_q(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask_qd,
                k_cache_ptr, KV_FP8)
    q_pos = ctx_start + tok

    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q * BLOCK_G], -1.0e30, dtype=tl.float32)
    bt_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_off_k = kv_head.to(tl.int64) * stride_kh
    kv_off_v = kv_head.to(tl.int64) * stride_vh
    num_free_tiles = (ctx_start + q_first + 1) // BLOCK_N
    kv_end = tl.minimum(ctx_start + q_first + BLOCK_Q, seq_len)
    for t in range(0, num_free_tiles):
        acc, l_i, m_i = attend_tile_scaled(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_ptr, t * BLOCK_N,
                                           seq_len, kv_off_k, kv_off_v, stride_kb, stride_ks, stride_vb, stride_vs,
                                           qk_scale, HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, 0, DOT_PRECISION)
    for t in range(num_free_tiles, tl.cdiv(kv_end, BLOCK_N)):
        acc, l_i, m_i = attend_tile_scaled(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_ptr, t * BLOCK_N,
                                           seq_len, kv_off_k, kv_off_v, stride_kb, stride_ks, stride_vb, stride_vs,
                                           qk_scale, HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, 2, DOT_PRECISION)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None] * v_scale
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask_qd)


def prefill_attention_scaled(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                             meta: AttentionMetadata, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                             skip_single_queries: bool = False,
                             config: PrefillConfig | None = None) -> torch.Tensor:
    """prefill_attention.prefill_attention over a cache holding k / k_scale and v / v_scale."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    fp8 = _is_fp8(k_cache)
    config = config or default_prefill_config(head_dim, q.dtype if fp8 else k_cache.dtype)
    block_g = triton.next_power_of_2(group)
    block_q = max(1, config.block_m // block_g)
    plan = prefill_plan(meta, block_q, q.device, skip_single_queries)
    num_tiles = _num_tiles(meta, block_q, skip_single_queries)
    if num_tiles == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    _prefill_scaled_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, plan[0], plan[1], out,
        scale * float(k_scale) * LOG2E, float(v_scale),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_Q=block_q, BLOCK_G=block_g,
        BLOCK_D=block_d, BLOCK_N=config.block_n, DOT_PRECISION=_precision(q, k_cache), KV_FP8=fp8,
        num_warps=config.num_warps, num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def paged_attention_scaled(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> torch.Tensor:
    """attention.paged_attention (the same dispatch between the decode and prefill kernels, the same
    TritonAttentionMetadata plans) over a cache holding k / k_scale and v / v_scale; the twin of
    torch_ref.quant.paged_attention_fp8."""
    _check_shapes(q, k, v, k_cache, v_cache)
    if k is not None and v is not None:
        store_kvcache_scaled(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
    out = utils.empty_output(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    decode_only = meta.max_query_len == 1
    num_decodes = meta.seq_lens.shape[0] if decode_only else _count_single_queries(meta)
    plan = meta if isinstance(meta, TritonAttentionMetadata) else None
    if num_decodes:
        num_splits = plan.num_splits if plan is not None else None
        if num_splits is None:
            num_splits = decode_num_splits(num_decodes, k_cache.shape[2],
                                           meta.max_seq_len if utils.interpreting() else None)
        elif int(num_splits) < 1:
            raise ValueError(f"meta.num_splits: must be >= 1, got {num_splits}")
        order, split_len = (plan.decode_order, plan.decode_split_len) if plan is not None else (None, None)
        if order is None or split_len is None:
            order, split_len = _eager_balance(meta, k_cache.shape[2], int(num_splits), q.device)
        prefix_len = plan.cascade_prefix_len if decode_only and plan is not None else None
        decode_attention_scaled(q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                scale, int(num_splits), k_scale, v_scale,
                                scratch=plan.decode_scratch if plan is not None else None, prefix_len=prefix_len,
                                order=order, split_len=split_len)
    if not decode_only:
        prefill_attention_scaled(q, k_cache, v_cache, out, meta, scale, k_scale, v_scale, skip_single_queries=True)
    return out
