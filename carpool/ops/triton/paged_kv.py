"""Paged KV cache primitives shared by the decode and prefill attention kernels.

- `store_kvcache`: write each new token's K/V to its cache slot (slots < 0 are padding, skipped);
  `slot_row` is the slot lookup it shares with the fused RoPE + store kernel (elementwise.py).
- `attend_tile`: one step of online-softmax attention over a BLOCK_N-token tile of a request's context,
  gathered through its block table. Scores live in the log2 domain (`qk_scale` = scale * log2(e)) so
  the softmax uses exp2, and the running max starts at a large finite negative value instead of -inf:
  a row with no visible key yet then keeps alpha = 1 and p = 0 rather than computing -inf - -inf = nan.

Cache layout: [num_blocks, page_size, num_kv_heads, head_dim], last dim contiguous; token n of a request
lives at page `block_table[n // page_size]`, row `n % page_size`.

An FP8 cache (`--kv-cache-dtype fp8`, e4m3) holds k / k_scale and v / v_scale (one scale per layer each),
saturated to e4m3's range. The kernels take it through a `KV_FP8` constexpr, so a model-dtype cache
compiles to exactly the code it would without it: stores divide by the scale and round to e4m3
(`kv_cache_value`); attention keeps the query in its own dtype instead of converting it to the cache's,
converts each K/V tile to the query's dtype after loading (`attend_tile`), and folds the scales in where
they cost nothing: k_scale into the softmax scale (q . (s k) = s (q . k)), v_scale into the normalized
output (sum p (s v) = s sum p v). Only the cache bytes halve, which is what decode attention (bandwidth
bound) pays for; the score and output tiles stay 16-bit on the tensor cores.

Those 16-bit tiles are float16 whatever the model dtype (`fp8_tile_query`): sm_90 converts e4m3 pairs to
float16 in one instruction (cvt.rn.f16x2.e4m3x2), while bfloat16 takes a second, per-element conversion
(F2F, a quarter-rate pipe) that costs an SM about as many cycles per tile as its share of HBM bandwidth
takes to bring the tile in, so a bf16-tiled FP8 decode is bound by conversions instead of bytes. float16
holds every e4m3 value exactly, and the probabilities p (in [0, 1]) with more mantissa than bfloat16; a
16-bit query is scaled per row by a power of two into float16's range and the scores by its inverse, so
q . k is the same product of the same values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.fp8 import e4m3_pairs_to, to_e4m3
from carpool.ops.triton.utils import pdl_enter

KV_CACHE_FP8_DTYPE = torch.float8_e4m3fn
LOG2E = 1.4426950408889634  # scores are kept in the log2 domain: qk_scale = scale * LOG2E

# Tile kinds for attend_tile's MASK argument.
MASK_NONE = 0  # every key of the tile is valid and visible to every query row
MASK_LENGTH = 1  # keys at or beyond seq_len are invalid (decode)
MASK_CAUSAL = 2  # key n is visible to query row r iff n <= q_pos[r] and n < seq_len (prefill diagonal)


@triton.jit
def slot_row(slot_ptr, t, n_heads, PAGE_SIZE: tl.constexpr):
    """(page, row, number of heads to write) of token t's cache slot; padding (slot < 0) writes none.
    (An integer bound rather than `scalar_bool & mask`: the interpreter mistypes that broadcast.)"""
    slot = tl.load(slot_ptr + t).to(tl.int64)
    n_store = tl.where(slot >= 0, n_heads, 0)
    slot = tl.maximum(slot, 0)
    return slot // PAGE_SIZE, slot % PAGE_SIZE, n_store


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == KV_CACHE_FP8_DTYPE


def check_kv_scales(cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Scales other than 1 belong to an FP8 cache: a model-dtype cache stores values as they are."""
    assert is_fp8_cache(cache) or (k_scale == 1.0 and v_scale == 1.0), \
        f"k_scale, v_scale ({k_scale}, {v_scale}) given for a {cache.dtype} KV cache"


@triton.jit
def kv_cache_value(x, scale, cache_ptr, KV_FP8: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr):
    """x as the cache at cache_ptr stores it: x / scale in e4m3 (saturated), or x in the model dtype."""
    if KV_FP8:
        return to_e4m3(x.to(tl.float32) / scale, cache_ptr, SOFTWARE_ROUNDING)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, n_heads,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, k_scale, v_scale,
                     HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr,
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
    tl.store(kc, kv_cache_value(k, k_scale, k_cache_ptr, KV_FP8, SOFTWARE_ROUNDING), mask=mask)
    tl.store(vc, kv_cache_value(v, v_scale, v_cache_ptr, KV_FP8, SOFTWARE_ROUNDING), mask=mask)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k_cache/v_cache[slot // page_size, slot % page_size] = k/v[t] for every t with slot >= 0 (an FP8
    cache: k/k_scale and v/v_scale in e4m3).

    One program per token, so the grid depends only on the number of tokens (CUDA-graph safe)."""
    n_tokens, n_heads, head_dim = k.shape
    if n_tokens == 0:
        return
    check_kv_scales(k_cache, k_scale, v_scale)
    page_size = k_cache.shape[1]
    _store_kv_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, n_heads, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), float(k_scale), float(v_scale), HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=is_fp8_cache(k_cache), SOFTWARE_ROUNDING=utils.interpreting(), num_warps=4,
        USE_PDL=utils.pdl(), launch_pdl=utils.pdl())


@triton.jit
def fp8_tile_query(q, qk_scale):
    """(q, qk_scale) for attend_tile over an FP8 cache: a 16-bit q [M, D] as float16, each row scaled by
    2^-e (an integer e >= 0, so that |q| 2^-e <= 2^15, inside float16's 65504; e = 0 for rows within
    2^14) and qk_scale as [M, 1] times 2^e; a float32 q (correctness runs) is returned as it is."""
    if q.dtype == tl.float32:
        return q, qk_scale
    qf = q.to(tl.float32)
    amax = tl.max(tl.abs(qf), axis=1)
    # log2 is approximate: the margin of one power of two keeps the bound whichever way it rounds.
    e = tl.maximum(tl.ceil(tl.log2(tl.maximum(amax, 1.0))) - 14.0, 0.0)
    return (qf * tl.exp2(-e)[:, None]).to(tl.float16), (qk_scale * tl.exp2(e))[:, None]


# How attend_tile converts FP8 tiles (its E4M3_PAIRS argument). Triton's own cast of an e4m3 tile feeding
# tl.dot is moved by the compiler into the dot-operand layout, where each thread reads its bytes from
# shared memory one by one. Read as int16 pairs instead, K's shared-memory reads are 8-byte vectors and V
# is converted before it is staged for the dot; with one cvt.rn.f16x2.e4m3x2 per pair (inline PTX)
# the decode loop compiles to ~17% fewer instructions per key at Qwen3-0.6B's heads (sm_90, Triton 3.6:
# scripts/triton_compile_check.py's loop census).
# (constexpr: kernels read them; `.value` is the int a launcher passes)
E4M3_CAST = tl.constexpr(0)  # Triton's cast of each tile
E4M3_PAIRS_CAST = tl.constexpr(1)  # int16 pairs, each byte converted by Triton's cast (interpreter; float32 tiles)
E4M3_PAIRS_PTX = tl.constexpr(2)  # int16 pairs, one cvt.rn.f16x2.e4m3x2 each (float16 tiles on a GPU)


def e4m3_pairs_mode(pairs: bool, tile_dtype: torch.dtype, *caches: torch.Tensor) -> int:
    """attend_tile's E4M3_PAIRS for FP8 caches: pairs where asked and every cache's rows and strides are
    whole pairs (even head_dim, page and head strides), with the PTX conversion off the interpreter for a
    16-bit query (tile_dtype: the query's; fp8_tile_query makes its tiles float16)."""
    if not pairs or any(c.stride(-1) != 1 or any(s % 2 for s in c.stride()[:-1]) or c.shape[-1] % 2 for c in caches):
        return E4M3_CAST.value
    return (E4M3_PAIRS_PTX if tile_dtype != torch.float32 and not utils.interpreting() else E4M3_PAIRS_CAST).value


@triton.jit
def _kv_tile(cache_ptr, row_off, key_ok, dtype: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             KV_FP8: tl.constexpr, E4M3_PAIRS: tl.constexpr):
    """The cache rows at cache_ptr + row_off [BLOCK_N, 1] (key_ok: rows to read; others and columns past
    HEAD_DIM are zero) as a [BLOCK_N, BLOCK_D] tile for tl.dot: as stored in a model-dtype cache; from an
    FP8 cache, converted to dtype by Triton's cast of the tile, or read as int16 pairs (row_off even)
    and converted pair by pair (E4M3_PAIRS)."""
    if KV_FP8 and E4M3_PAIRS != E4M3_CAST:
        offs_p = tl.arange(0, BLOCK_D // 2)
        mask = key_ok[:, None] & (offs_p < HEAD_DIM // 2)[None, :]
        pairs = tl.load(cache_ptr.to(tl.pointer_type(tl.int16)) + row_off // 2 + offs_p[None, :], mask=mask,
                        other=0)
        low, high = e4m3_pairs_to(pairs, dtype, E4M3_PAIRS == E4M3_PAIRS_PTX)
        return tl.interleave(low, high)
    offs_d = tl.arange(0, BLOCK_D)
    mask = key_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tile = tl.load(cache_ptr + row_off + offs_d[None, :], mask=mask, other=0.0)
    if KV_FP8:
        tile = tile.to(dtype)
    return tile


@triton.jit
def attend_tile(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_ptr, start_n, seq_len,
                kv_head_off_k, kv_head_off_v, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
                HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                E4M3_PAIRS: tl.constexpr = E4M3_CAST):
    """Fold keys [start_n, start_n + BLOCK_N) into the running (acc, l_i, m_i) of query rows q.

    q: [M, BLOCK_D] in the cache dtype (KV_FP8: float16 or float32 from fp8_tile_query, which the e4m3 tiles
    are converted to, as E4M3_PAIRS says; qk_scale, a scalar or [M, 1], then carries k_scale); q_pos: [M]
    absolute positions (used by MASK_CAUSAL only); bt_ptr points at this request's block-table row. Returns
    the updated (acc, l_i, m_i)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASK == 0:
        key_ok = offs_n >= 0  # all true; keeps one code path for the masks below
    else:
        key_ok = offs_n < seq_len
    # A tile may span several pages (BLOCK_N > PAGE_SIZE): look up each key's page on its own.
    page = tl.load(bt_ptr + offs_n // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
    row = offs_n % PAGE_SIZE
    k = _kv_tile(k_cache_ptr, kv_head_off_k + page[:, None] * stride_kb + row[:, None] * stride_ks, key_ok,
                 q.dtype, HEAD_DIM, BLOCK_D, KV_FP8, E4M3_PAIRS)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASK == 1:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    if MASK == 2:
        s = tl.where(key_ok[None, :] & (offs_n[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _kv_tile(v_cache_ptr, kv_head_off_v + page[:, None] * stride_vb + row[:, None] * stride_vs, key_ok,
                 q.dtype, HEAD_DIM, BLOCK_D, KV_FP8, E4M3_PAIRS)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new
