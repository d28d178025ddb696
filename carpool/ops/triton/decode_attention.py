"""Split-K paged decode attention for the requests with exactly one query token, CUDA-graph safe.

Grid: (num_kv_heads * num_splits, num_reqs) -- it depends on nothing that changes between graph
replays. Programs of requests whose query length is not 1 (prefill chunks of a mixed batch, which the
prefill kernel handles, or graph padding with none) do nothing. Program (h * num_splits + s, i) stacks
the GROUP query heads that share KV head h into the rows of one [BLOCK_G, D] tile, so every K/V byte is
read once per step and each KV tile costs one `tl.dot` for the whole group.

Work balance (contexts of mixed lengths): GPUs start programs in grid order, dim 0 fastest, so all splits
and KV heads of one request start together, and with `order` (request indices, longest context first)
the program row i serves request order[i]: the longest work starts first and short work fills the tail.
Request r's context is cut into `used` ranges of whole tiles, used = min(num_splits, cdiv(its tiles,
split tiles)), where split tiles come from `split_len` (keys per split, a device scalar the host plans
per step) or DecodeConfig.min_split_tiles; the program reads seq_lens on the device and walks only its
own range, and splits >= used write nothing. A request with one split writes the output directly;
otherwise each split writes a normalized partial output and its log2-sum-exp into scratch rows indexed
by request, and `_merge_kernel` (grid (num_reqs, num_q_heads)) combines the `used` splits:
    out = sum_s 2^(lse_s - max) * o_s / sum_s 2^(lse_s - max).
With a shared prefix (cascade) every split writes a partial (idle ones with weight 0) and the merge
reads all slots, the prefix kernel's too.

An FP8 cache (KV_FP8, paged_kv.py's docstring): the tiles are float16 (fp8_tile_query), k_scale is in
qk_scale, the normalized outputs are multiplied by v_scale before they are written or merged, and a tile
holds twice the keys (FP8_DECODE_CONFIG), except where a cascade's prefix alignment caps it.

Latency (batch 1 under PDL): both kernels launch while the kernel before them still runs and read the
step's metadata before they wait for it. (Loading the first tile's older keys before the wait as well
was slower at batch 1: EXPERIMENTS.md run 65.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from carpool.forward_batch import CASCADE_ALIGN  # prefix kernel tile; split kernel tiles divide it
from carpool.ops.triton import utils
from carpool.ops.triton.paged_kv import (
    LOG2E,
    attend_tile,
    check_kv_scales,
    e4m3_pairs_mode,
    fp8_tile_query,
    is_fp8_cache,
)
from carpool.ops.triton.utils import pdl_enter, pdl_release, pdl_wait


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (no autotuning: benchmarks/bench_kernels.py sweeps them)."""
    block_n: int = 64  # keys per tile; may span pages
    num_warps: int = 4
    num_stages: int = 2
    min_split_tiles: int = 1  # a split gets at least this many tiles, so short contexts use fewer splits
    # an FP8 cache: tiles read as e4m3 pairs, one conversion each (paged_kv.E4M3_PAIRS_PTX), not Triton's
    # cast of each tile (fewer instructions per key offline; bench_kernels.py --parts fp8 times both)
    e4m3_pairs: bool = True


# Over an FP8 cache a key costs half the bytes, so a tile of twice the keys moves what the model-dtype
# tile moves per load: with the same bytes in flight per program (a load is issued a tile ahead), decode
# stays as close to HBM bandwidth while reading half the bytes. Compiled for sm_90 at Qwen3-0.6B's heads
# (16 q / 8 KV, head_dim 128; Triton 3.6, tiles read as e4m3 pairs), no spills: 105 registers and 72 KiB
# of shared memory at 8 warps, ~1,070 thread-instructions per key in the loop (4 warps: 142 registers,
# ~920; Triton's per-tile cast: 142 and ~1,290; the bf16 cache's 64-key tile: ~770).
# Unmeasured: `benchmarks/bench_kernels.py --parts fp8` sweeps tiles, warps, stages, the conversion and
# plans against bf16.
FP8_DECODE_CONFIG = DecodeConfig(block_n=128, num_warps=8)


def default_decode_config(head_dim: int, dtype: torch.dtype, kv_fp8: bool = False) -> DecodeConfig:
    """dtype: the tiles' (the cache's, or the query's over an FP8 cache). An FP8 cache takes twice the
    model-dtype tile's keys (FP8_DECODE_CONFIG)."""
    if dtype == torch.float32:  # correctness runs only: keep fp32 tiles out of local memory
        return DecodeConfig(block_n=32, num_stages=1)
    if kv_fp8:
        return FP8_DECODE_CONFIG if head_dim <= 128 else DecodeConfig(block_n=64, num_warps=8)
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32)


@triton.jit
def _used_splits(num_tiles, split_len_ptr, NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_SPLIT_LEN: tl.constexpr):
    """Splits a request of num_tiles tiles uses (the split and merge kernels must agree): one per
    split_len keys (or MIN_SPLIT_TILES tiles without split_len), at least 1, at most NUM_SPLITS."""
    if HAS_SPLIT_LEN:
        split_tiles = tl.maximum(tl.cdiv(tl.load(split_len_ptr), BLOCK_N), 1)
    else:
        split_tiles = MIN_SPLIT_TILES
    return tl.minimum(tl.maximum(tl.cdiv(num_tiles, split_tiles), 1), NUM_SPLITS)


@triton.jit
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
                   out_ptr, part_out_ptr, part_lse_ptr, ctx_start_ptr, order_ptr, split_len_ptr, qk_scale,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   stride_bt, stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
                   v_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   HAS_PREFIX: tl.constexpr, HAS_ORDER: tl.constexpr, HAS_SPLIT_LEN: tl.constexpr,
                   KV_FP8: tl.constexpr, E4M3_PAIRS: tl.constexpr, USE_PDL: tl.constexpr):
    # Until pdl_wait: only the step's metadata, complete before this layer's q/k/v projection started
    # (utils.pdl_wait).
    pdl_release(USE_PDL)
    kv_head = tl.program_id(0) // NUM_SPLITS
    split = tl.program_id(0) % NUM_SPLITS
    req = tl.program_id(1)
    if HAS_ORDER:
        req = tl.load(order_ptr + req)
    q_row = tl.load(qsl_ptr + req)
    is_decode = tl.load(qsl_ptr + req + 1) - q_row == 1
    # Any other request attends to nothing here and writes nothing.
    seq_len = tl.where(is_decode, tl.load(seq_lens_ptr + req), 0)

    # With a shared prefix (cascade), this kernel covers only the keys after it: they start at a tile
    # boundary (the runner makes the prefix length a multiple of BLOCK_N).
    first_tile = 0
    if HAS_PREFIX:
        first_tile = tl.load(ctx_start_ptr) // BLOCK_N
    num_tiles = tl.maximum(tl.cdiv(seq_len, BLOCK_N) - first_tile, 0)
    used_splits = _used_splits(num_tiles, split_len_ptr, NUM_SPLITS, MIN_SPLIT_TILES, BLOCK_N, HAS_SPLIT_LEN)
    tiles_per_split = tl.cdiv(num_tiles, used_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, first_tile + num_tiles)  # empty loop for idle splits

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    # Query rows this program serves: none for other requests and idle splits. (Integer bounds instead of
    # `& is_decode`: the interpreter mistypes a broadcast scalar bool.)
    num_rows = tl.where(is_decode, GROUP, 0)
    active_rows = tl.where(split < used_splits, num_rows, 0)
    mask_d = offs_d[None, :] < HEAD_DIM
    q_row64 = q_row.to(tl.int64)
    bt_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_off_k = kv_head.to(tl.int64) * stride_kh
    kv_off_v = kv_head.to(tl.int64) * stride_vh
    pdl_wait(USE_PDL)

    q = tl.load(q_ptr + q_row64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < active_rows)[:, None] & mask_d, other=0.0)
    if KV_FP8:
        q, qk_scale = fp8_tile_query(q, qk_scale)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, m_i, k_cache_ptr, v_cache_ptr, bt_ptr, tile * BLOCK_N,
                                    seq_len, kv_off_k, kv_off_v, stride_kb, stride_ks, stride_vb, stride_vs,
                                    qk_scale, HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, 1, DOT_PRECISION, KV_FP8,
                                    E4M3_PAIRS)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * v_scale
    if HAS_PREFIX:
        # The merge reads every slot: idle splits write o = 0 and lse = -inf, which weigh 0.
        part_rows = num_rows
    else:
        # A request with one split writes its output here, and the merge skips it.
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
def _prefix_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, qsl_ptr, prefix_len_ptr, part_out_ptr,
                   part_lse_ptr, num_reqs, qk_scale, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb,
                   stride_vs, stride_vh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, v_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, SLOT0: tl.constexpr,
                   PREFIX_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                   USE_PDL: tl.constexpr):
    """Cascade attention, shared part: every decode query of the batch against the prefix of keys all
    requests share (same blocks, read through request 0's block table). Rows of a tile are (request,
    query head of this KV head) pairs, so each prefix K/V tile is read once for BLOCK_M rows instead of
    once per request. Writes normalized partials and log2-sum-exp at split slots SLOT0.. for the merge."""
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
    row_ok = (req < num_reqs) & (q_end - q_row == 1)  # decode queries only
    q_row = q_row.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_qd = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=mask_qd,
                other=0.0)
    if KV_FP8:
        q, qk_scale = fp8_tile_query(q, qk_scale)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    num_tiles = prefix_len // BLOCK_N  # the prefix is a whole number of tiles
    tiles_per_split = tl.cdiv(num_tiles, PREFIX_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    for tile in range(tile_lo, tile_hi):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, m_i, k_cache_ptr, v_cache_ptr, block_tables_ptr,
                                    tile * BLOCK_N, prefix_len, kv_head.to(tl.int64) * stride_kh,
                                    kv_head.to(tl.int64) * stride_vh, stride_kb, stride_ks, stride_vb, stride_vs,
                                    qk_scale, HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, 0, DOT_PRECISION, KV_FP8)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * v_scale
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    req64 = req.to(tl.int64)
    slot = SLOT0 + split
    tl.store(part_out_ptr + req64[:, None] * stride_pt + head[:, None] * stride_ph + slot * stride_ps
             + offs_d[None, :], o, mask=mask_qd)
    tl.store(part_lse_ptr + req64 * stride_lt + head * stride_lh + slot, lse, mask=row_ok)


@triton.jit
def _merge_kernel(qsl_ptr, seq_lens_ptr, split_len_ptr, part_out_ptr, part_lse_ptr, out_ptr, stride_pt,
                  stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh, HEAD_DIM: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, NUM_SLOTS: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_SPLIT_LEN: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_release(USE_PDL)  # the step's metadata is read before the wait (see _decode_kernel)
    req = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(qsl_ptr + req)
    is_decode = tl.load(qsl_ptr + req + 1) - q_row == 1
    # Slots to combine (integer bounds: see _decode_kernel); 0 = nothing to do here.
    if HAS_PREFIX:
        num_slots = tl.where(is_decode, NUM_SLOTS, 0)  # all written, the prefix kernel's too
    else:
        seq_len = tl.where(is_decode, tl.load(seq_lens_ptr + req), 0)
        used_splits = _used_splits(tl.cdiv(seq_len, BLOCK_N), split_len_ptr, NUM_SPLITS, MIN_SPLIT_TILES,
                                   BLOCK_N, HAS_SPLIT_LEN)
        num_slots = tl.where(used_splits > 1, used_splits, 0)  # one split wrote the output itself
    q_row64 = q_row.to(tl.int64)
    req64 = req.to(tl.int64)
    pdl_wait(USE_PDL)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_slots
    lse = tl.load(part_lse_ptr + req64 * stride_lt + head * stride_lh + offs_s, mask=s_ok,
                  other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_len 0): weights 0, output 0
    w = tl.exp2(lse - m)
    mask = s_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    part = tl.load(part_out_ptr + req64 * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps
                   + offs_d[None, :], mask=mask, other=0.0)
    denom = tl.sum(w, axis=0)
    o = tl.sum(part * w[:, None], axis=0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + q_row64 * stride_ot + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < tl.where(num_slots > 0, HEAD_DIM, 0))


def decode_scratch(num_reqs: int, num_q_heads: int, num_splits: int, head_dim: int,
                   device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs [num_reqs, Hq, S, D] and their log2-sum-exp [num_reqs, Hq, S], float32."""
    return (utils.empty_output((num_reqs, num_q_heads, num_splits, head_dim), torch.float32, device),
            utils.empty_output((num_reqs, num_q_heads, num_splits), torch.float32, device))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     scale: float, num_splits: int, config: DecodeConfig | None = None,
                     scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
                     prefix_len: torch.Tensor | None = None, prefix_splits: int = 8,
                     order: torch.Tensor | None = None, split_len: torch.Tensor | None = None,
                     k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Attention of each 1-query request over its whole cached context; writes those rows of `out`.

    K/V of the new tokens must already be in the cache. `scratch` (see decode_scratch) may be larger
    than needed in its request and split dims; without it, one is allocated here (inside a CUDA graph
    capture that memory comes from the graph's pool, so replays reuse it).

    `prefix_len` (a 1-element int32 device tensor) turns on cascade attention: all requests share their
    first prefix_len keys (same blocks; a multiple of 64, at most every request's context minus one),
    which `_prefix_kernel` reads once for the whole batch while the split kernel covers each request's
    own keys after it; the merge combines both. Zero is allowed (nothing shared), so a captured graph can
    keep the cascade kernels for every replay.

    Work balance for mixed context lengths (see the module docstring; the host plans both per step,
    attention.balanced_decode_plan): `order` ([num_reqs] int32 device tensor) is the permutation of the
    requests in which their programs start, longest context first; `split_len` (a 1-element int32
    device tensor) is the keys per split, which sets each request's own split count up to num_splits.

    An FP8 cache holds k / k_scale and v / v_scale (paged_kv.py); a model-dtype cache takes scales of 1."""
    num_reqs = seq_lens.shape[0]
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if num_reqs == 0 or num_tokens == 0:
        return out
    check_kv_scales(k_cache, k_scale, v_scale)
    kv_fp8 = is_fp8_cache(k_cache)
    tile_dtype = q.dtype if kv_fp8 else k_cache.dtype
    config = config or default_decode_config(head_dim, tile_dtype, kv_fp8)
    cascade = prefix_len is not None
    if cascade and CASCADE_ALIGN % config.block_n:
        # The split kernel starts after the prefix at a tile boundary: its tiles must divide the prefix.
        config = replace(config, block_n=CASCADE_ALIGN)
    num_slots = num_splits + (prefix_splits if cascade else 0)
    if num_slots > 1:
        part_out, part_lse = scratch if scratch is not None else decode_scratch(
            num_reqs, num_q_heads, num_slots, head_dim, q.device)
        if (part_out.shape[0] < num_reqs or part_out.shape[2] < num_slots
                or part_lse.shape[0] < num_reqs or part_lse.shape[2] < num_slots):
            raise ValueError(f"decode scratch: need >= [{num_reqs}, {num_q_heads}, {num_slots}, ...], "
                             f"got {tuple(part_out.shape)} and {tuple(part_lse.shape)}")
        if part_out.stride(-1) != 1 or part_lse.stride(-1) != 1 or part_out.dtype != torch.float32:
            raise ValueError("decode scratch: float32 with a contiguous last dim expected")
    else:
        part_out, part_lse = out, out  # unused: the kernel writes `out` directly
    block_d = max(16, triton.next_power_of_2(head_dim))
    # tl.dot needs at least 16 rows: a GQA group smaller than that is padded with masked rows.
    block_g = max(16, triton.next_power_of_2(group))
    precision = "ieee" if tile_dtype == torch.float32 else "tf32"
    qk_scale = scale * k_scale * LOG2E
    ctx_start = prefix_len if cascade else seq_lens  # (unread without a prefix)
    if order is not None and order.shape[0] < num_reqs:
        raise ValueError(f"decode order: need >= {num_reqs} request indices, got {order.shape[0]}")
    _decode_kernel[(num_kv_heads * num_splits, num_reqs)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_lse, ctx_start,
        seq_lens if order is None else order, seq_lens if split_len is None else split_len,  # (unread if None)
        qk_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), float(v_scale),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, NUM_SPLITS=num_splits,
        MIN_SPLIT_TILES=config.min_split_tiles, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=config.block_n,
        DOT_PRECISION=precision, HAS_PREFIX=cascade, HAS_ORDER=order is not None,
        HAS_SPLIT_LEN=split_len is not None, KV_FP8=kv_fp8,
        E4M3_PAIRS=e4m3_pairs_mode(kv_fp8 and config.e4m3_pairs, tile_dtype, k_cache, v_cache),
        num_warps=config.num_warps, num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    if cascade:
        assert prefix_len is not None
        block_m = 64 if tile_dtype == torch.float32 else 128
        _prefix_kernel[(triton.cdiv(num_reqs * group, block_m), num_kv_heads, prefix_splits)](
            q, k_cache, v_cache, block_tables, query_start_loc, prefix_len, part_out, part_lse, num_reqs,
            qk_scale, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            float(v_scale), GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, SLOT0=num_splits,
            PREFIX_SPLITS=prefix_splits, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=CASCADE_ALIGN,
            DOT_PRECISION=precision, KV_FP8=kv_fp8, num_warps=8 if block_m == 128 else 4, num_stages=2,
            USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    if num_slots > 1:
        _merge_kernel[(num_reqs, num_q_heads)](
            query_start_loc, seq_lens, seq_lens if split_len is None else split_len, part_out, part_lse, out,
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            NUM_SLOTS=num_slots, MIN_SPLIT_TILES=config.min_split_tiles, BLOCK_N=config.block_n,
            HAS_PREFIX=cascade, HAS_SPLIT_LEN=split_len is not None, BLOCK_S=triton.next_power_of_2(num_slots),
            BLOCK_D=block_d, num_warps=4 if block_d >= 128 else 2, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out
