"""Flash-attention style prefill/extend attention over the paged cache (any mix of query lengths).

Grid: (num_query_tiles, num_kv_heads). A query tile is up to BLOCK_Q consecutive query tokens of one
request; its rows are (token, head-in-group) pairs, head fastest, so the GQA group shares each K/V tile
and one `tl.dot` covers BLOCK_Q * BLOCK_G rows. The program walks the request's context through its
block table (cached prefix and this step's tokens alike: the new K/V were stored first), in two loops:
keys every row of the tile may see (no mask), then the few tiles along the causal diagonal (masked).

The program -> (request, first query) map is built on the host from `query_start_loc_cpu` /
`seq_lens_cpu` (prefill steps are not graph-captured), longest work first so the tail of the grid is
short, and cached per step (utils.step_plan) so all layers of a step share one upload. Requests with a single
query can be left out of it (`skip_single_queries`): the dispatcher gives those to the decode kernel,
which splits long contexts and wastes no tile rows.

An FP8 cache (KV_FP8, paged_kv.py's docstring): the tiles are float16 (fp8_tile_query), k_scale is in
qk_scale and the normalized output is multiplied by v_scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from carpool.forward_batch import AttentionMetadata
from carpool.ops.triton import utils
from carpool.ops.triton.paged_kv import LOG2E, attend_tile, check_kv_scales, fp8_tile_query, is_fp8_cache
from carpool.ops.triton.utils import pdl_enter
from carpool.platform import to_device
from carpool.utils import cdiv


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 128  # rows per program = BLOCK_Q query tokens x BLOCK_G heads of one GQA group
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """dtype: the tiles' (the cache's, or the query's over an FP8 cache)."""
    if dtype == torch.float32:  # correctness runs only: smaller tiles keep fp32 tiles out of local memory
        return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=1)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=2)
    if head_dim <= 128:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=2)
    return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=1)


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
                    tile_req_ptr, tile_q_ptr, out_ptr, qk_scale,
                    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    stride_bt, stride_ot, stride_oh, v_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                    USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(tile_req_ptr + tile)
    q_first = tl.load(tile_q_ptr + tile)  # index of the tile's first query within its request
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_start = seq_len - q_len  # queries are the last q_len positions of the context

    offs_m = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = q_first + offs_m // BLOCK_G
    g = offs_m % BLOCK_G
    row_ok = (tok < q_len) & (g < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    mask_qd = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = (q_start + tok).to(tl.int64)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_qd, other=0.0)
    if KV_FP8:
        q, qk_scale = fp8_tile_query(q, qk_scale)
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)
    q_pos = ctx_start + tok

    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q * BLOCK_G], -1.0e30, dtype=tl.float32)
    bt_ptr = block_tables_ptr + req.to(tl.int64) * stride_bt
    kv_off_k = kv_head.to(tl.int64) * stride_kh
    kv_off_v = kv_head.to(tl.int64) * stride_vh
    # Keys 0 .. ctx_start + q_first are visible to every row (all < seq_len): whole tiles of them
    # need no mask. The rest, up to the last row's position, lie on the causal diagonal.
    num_free_tiles = (ctx_start + q_first + 1) // BLOCK_N
    kv_end = tl.minimum(ctx_start + q_first + BLOCK_Q, seq_len)
    for t in range(0, num_free_tiles):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_ptr, t * BLOCK_N,
                                    seq_len, kv_off_k, kv_off_v, stride_kb, stride_ks, stride_vb, stride_vs,
                                    qk_scale, HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, 0, DOT_PRECISION,
                                    KV_FP8)
    for t in range(num_free_tiles, tl.cdiv(kv_end, BLOCK_N)):
        acc, l_i, m_i = attend_tile(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_ptr, t * BLOCK_N,
                                    seq_len, kv_off_k, kv_off_v, stride_kb, stride_ks, stride_vb, stride_vs,
                                    qk_scale, HEAD_DIM, PAGE_SIZE, BLOCK_D, BLOCK_N, 2, DOT_PRECISION,
                                    KV_FP8)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * v_scale
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask_qd)


def prefill_plan(meta: AttentionMetadata, block_q: int, device: torch.device,
                 skip_single_queries: bool) -> torch.Tensor:
    """[2, num_tiles] int32 on `device`: (request, first query index) of each program, heaviest first."""
    def build(qsl: list[int], seq_lens: list[int]) -> torch.Tensor:
        return _build_plan(qsl, seq_lens, block_q, device, skip_single_queries)
    return utils.step_plan(meta, f"prefill_{block_q}_{int(skip_single_queries)}", build)


def _build_plan(qsl: list[int], seq_lens: list[int], block_q: int, device: torch.device,
                skip_single_queries: bool) -> torch.Tensor:
    work: list[tuple[int, int, int]] = []
    for i, seq_len in enumerate(seq_lens):
        q_len = qsl[i + 1] - qsl[i]
        if q_len == 1 and skip_single_queries:
            continue
        for first in range(0, q_len, block_q):
            # Keys this tile reads: the context up to its last query.
            work.append((seq_len - q_len + min(first + block_q, q_len), i, first))
    work.sort(key=lambda w: -w[0])
    # Row width padded to a multiple of 4 int32s: plan[1] then always starts 16-byte aligned, and Triton
    # (which specializes on pointer alignment) keeps one compiled variant instead of compiling a second
    # one mid-run the first time the tile count is not a multiple of 4. Programs never read the padding.
    width = cdiv(len(work), 4) * 4
    plan = torch.zeros(2, width, dtype=torch.int32)
    if work:
        plan[0, :len(work)] = torch.tensor([w[1] for w in work], dtype=torch.int32)
        plan[1, :len(work)] = torch.tensor([w[2] for w in work], dtype=torch.int32)
    return to_device(plan, device)


def _num_tiles(meta: AttentionMetadata, block_q: int, skip_single_queries: bool) -> int:
    qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    return sum(cdiv(n, block_q) for n in q_lens if not (n == 1 and skip_single_queries))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      meta: AttentionMetadata, scale: float, skip_single_queries: bool = False,
                      config: PrefillConfig | None = None, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> torch.Tensor:
    """Causal attention of the requests' queries over their contexts; writes those rows of `out`.

    K/V of the new tokens must already be in the cache. With skip_single_queries, requests with one
    query are left to the decode kernel. An FP8 cache holds k / k_scale and v / v_scale (paged_kv.py);
    a model-dtype cache takes scales of 1."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    check_kv_scales(k_cache, k_scale, v_scale)
    kv_fp8 = is_fp8_cache(k_cache)
    tile_dtype = q.dtype if kv_fp8 else k_cache.dtype
    config = config or default_prefill_config(head_dim, tile_dtype)
    block_g = triton.next_power_of_2(group)
    # Both powers of two, so row // BLOCK_G and row % BLOCK_G in the kernel are a shift and a mask.
    block_q = max(1, config.block_m // block_g)
    plan = prefill_plan(meta, block_q, q.device, skip_single_queries)
    num_tiles = _num_tiles(meta, block_q, skip_single_queries)
    if num_tiles == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if tile_dtype == torch.float32 else "tf32"
    _prefill_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, plan[0], plan[1], out,
        scale * k_scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        out.stride(0), out.stride(1), float(v_scale),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_Q=block_q, BLOCK_G=block_g,
        BLOCK_D=block_d, BLOCK_N=config.block_n, DOT_PRECISION=precision, KV_FP8=kv_fp8,
        num_warps=config.num_warps, num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out
