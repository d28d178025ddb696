"""paged_attention for Triton: the torch_ref contract, dispatched to a decode or a prefill kernel.

Decode-only steps (meta.max_query_len == 1) go to the split-K decode kernel alone, whose launch is
CUDA-graph safe. Other steps (prefill chunks, prefix hits, mixed batches) run the prefill kernel over
the requests with several queries and, when there are any, the decode kernel over those with one.

A `TritonAttentionMetadata` (forward_batch.py) may carry plans; a plain AttentionMetadata plans here:
- num_splits: the decode split count; a captured graph must fix it, because it shapes the grid.
  Default: `decode_num_splits(number of 1-query requests, num_kv_heads)`, from the table alone.
- decode_order and decode_split_len: the work balance of the decode kernel (see balanced_decode_plan),
  which a captured graph refills per replay. Without them they are planned here from the host lists,
  once per step for all layers (utils.step_plan).
- cascade_prefix_len: the number of leading keys every request of a decode-only step shares (same
  blocks), a multiple of CASCADE_ALIGN; 0 = none. Present = cascade on.
- decode_scratch: float32 buffers for the split partials (see decode_attention.decode_scratch); without
  them they are allocated per call, which is also graph safe (capture allocates from the graph's pool).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton

from carpool.forward_batch import AttentionMetadata, TritonAttentionMetadata
from carpool.ops.triton import utils
from carpool.ops.triton.decode_attention import decode_attention
from carpool.ops.triton.paged_kv import store_kvcache
from carpool.ops.triton.prefill_attention import prefill_attention
from carpool.platform import to_device
from carpool.utils import cdiv

# Decode split count by "units" = num_reqs * num_kv_heads, the programs there would be without
# splitting. An H100/H200 has 132 SMs and needs a few hundred programs in flight to saturate HBM, so
# few units get many splits. (at most this many units, splits); more units than the last row: 1 split.
# Measured on an H200 (benchmarks/results): batch 1 best at 16-32 splits, batch 8 at 8; with contexts
# of mixed lengths batch 64 (512 units) best at 2 balanced splits, batch >= 128 at 1 (EXPERIMENTS.md, run 30).
# Tune from benchmarks/bench_kernels.py, which reports the best split count per (batch, context).
DECODE_SPLIT_TABLE: tuple[tuple[int, int], ...] = ((8, 32), (32, 16), (128, 8), (256, 4), (512, 2))
MAX_DECODE_SPLITS = 32
# With a context-length hint, a split gets at least this many tokens, and so does a balanced plan's
# (about 2 tiles): more splits would only add merge work.
MIN_TOKENS_PER_SPLIT = 128
# Longest-first order pays where each request has one or two programs per KV head (mixed contexts in
# [100, 1100] on an H200 (EXPERIMENTS.md, run 30): batch 64 0.73 -> 0.82 of copy bandwidth with 2 splits, batch 128
# 0.84 -> 0.97 and batch 256 0.95 -> 1.01 with 1) and costs with more splits (batch 16, 8 splits:
# 0.48 -> 0.45), where the split count already spreads the long requests: those keep batch order.
ORDER_MAX_SPLITS = 2
# Work items (used splits x KV heads) a balanced plan aims for: a few waves of the programs an H100/H200
# keeps resident (132 SMs x ~3 decode programs), so the longest program is short next to the whole step.
DECODE_TARGET_ITEMS = 4 * 132 * 3


class DecodePlan(NamedTuple):
    """Work balance of one decode step (see decode_attention's module docstring)."""
    num_splits: int  # grid splits per request
    order: np.ndarray  # [num_reqs] int32: the requests in the order their programs start
    split_len: int  # keys per split (the kernel rounds it up to whole tiles)


def decode_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int | None = None) -> int:
    units = num_reqs * num_kv_heads
    splits = 1
    for max_units, s in DECODE_SPLIT_TABLE:
        if units <= max_units:
            splits = s
            break
    if max_seq_len is not None and max_seq_len > 0:
        splits = min(splits, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT))
    return max(1, min(splits, MAX_DECODE_SPLITS))


def balanced_decode_plan(seq_lens: list[int] | np.ndarray, num_kv_heads: int, num_splits: int | None = None,
                         target_items: int = DECODE_TARGET_ITEMS,
                         min_split_len: int = MIN_TOKENS_PER_SPLIT) -> DecodePlan:
    """Plan a decode step from host context lengths (0 for requests the decode kernel skips).

    With at most ORDER_MAX_SPLITS grid splits the longest requests start first, and splits of split_len
    = total keys x KV heads / target_items make about target_items work items of equal size, so programs
    finish together whatever the mix of lengths; a request shorter than that takes one (no merge work),
    one longer than num_splits of them takes num_splits. With more grid splits: batch order and one-tile
    splits. `num_splits`: the grid's (a captured graph's); default decode_num_splits."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    num_splits = num_splits or decode_num_splits(len(lens), num_kv_heads)
    if num_splits > ORDER_MAX_SPLITS:
        # Many splits already spread every request over the GPU: batch order and splits of one tile,
        # which were faster at batch 1 (uniform 1k-2k contexts: 8.4-9.4 against 9.9-11.2 us with
        # 128-key splits) and at batch 16 (mixed contexts, within 2%) on an H200 (EXPERIMENTS.md, run 31).
        return DecodePlan(num_splits, np.arange(len(lens), dtype=np.int32), 1)
    order = np.argsort(-lens, kind="stable").astype(np.int32)
    split_len = max(min_split_len, cdiv(num_kv_heads * int(lens.sum()), target_items))
    return DecodePlan(num_splits, order, split_len)


def _check_shapes(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, k_cache: torch.Tensor,
                  v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache, v_cache: expected equal [num_blocks, block_size, Hkv, D], got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both (to store them) or neither (already stored)")
    if k is not None and (k.dim() != 3 or v.shape != k.shape or k_cache.shape[2:] != k.shape[1:]):
        raise ValueError(f"k, v: expected [T, {k_cache.shape[2]}, {k_cache.shape[3]}] alike, got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(f"q: expected [T, Hq, {head_dim}] with Hq a multiple of {num_kv_heads}, "
                         f"got {tuple(q.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache, *((k, v) if k is not None else ()))):
        raise ValueError("q, k, v, k_cache, v_cache: last dim must be contiguous")


def paged_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """Store the new K/V (unless k = v = None: rope_and_store_kv did), then attend causally over each
    request's whole context (see torch_ref). An FP8 (e4m3) cache holds k / k_scale and v / v_scale
    (paged_kv.py); a model-dtype cache takes scales of 1.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D].
    Returns a contiguous [T, Hq, D] in q's dtype."""
    _check_shapes(q, k, v, k_cache, v_cache)
    if k is not None and v is not None:
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
    out = utils.empty_output(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    decode_only = meta.max_query_len == 1
    # Host-side count of 1-query requests; a decode-only step needs none (no host work under graphs).
    num_decodes = meta.seq_lens.shape[0] if decode_only else _count_single_queries(meta)
    plan = meta if isinstance(meta, TritonAttentionMetadata) else None
    if num_decodes:
        num_splits = plan.num_splits if plan is not None else None
        if num_splits is None:
            # From the table alone (no context hint): eager steps then use the same few split counts as
            # the captured graphs, so no step ever waits for a fresh compile of another NUM_SPLITS; a
            # short context simply leaves some splits idle (the kernel sizes its range on the device).
            # On CPU (the interpreter) nothing compiles, and each idle split still costs a program run
            # (~50 ms): there the context length is given as the hint.
            num_splits = decode_num_splits(num_decodes, k_cache.shape[2],
                                           meta.max_seq_len if utils.interpreting() else None)
        elif int(num_splits) < 1:
            raise ValueError(f"meta.num_splits: must be >= 1, got {num_splits}")
        order, split_len = (plan.decode_order, plan.decode_split_len) if plan is not None else (None, None)
        if order is None or split_len is None:
            order, split_len = _eager_balance(meta, k_cache.shape[2], int(num_splits), q.device)
        # Cascade (shared-prefix) attention only on decode-only steps, where the runner found the prefix.
        prefix_len = plan.cascade_prefix_len if decode_only and plan is not None else None
        decode_attention(q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                         scale, int(num_splits), scratch=plan.decode_scratch if plan is not None else None,
                         prefix_len=prefix_len, order=order, split_len=split_len, k_scale=k_scale,
                         v_scale=v_scale)
    if not decode_only:
        prefill_attention(q, k_cache, v_cache, out, meta, scale, skip_single_queries=True, k_scale=k_scale,
                          v_scale=v_scale)
    return out


def _count_single_queries(meta: AttentionMetadata) -> int:
    return utils.step_plan(meta, "num_single_queries",
                           lambda qsl, _: sum(1 for a, b in zip(qsl, qsl[1:]) if b - a == 1))


def _eager_balance(meta: AttentionMetadata, num_kv_heads: int, num_splits: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, split_len) of balanced_decode_plan on the device, one upload per step."""
    def build(qsl: list[int], seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lens = [s if b - a == 1 else 0 for s, a, b in zip(seq_lens, qsl, qsl[1:])]  # decodes only
        plan = balanced_decode_plan(lens, num_kv_heads, num_splits)
        # split_len at a multiple of 4 int32s: both pointers 16-byte aligned, as the graph runner's buffers,
        # so Triton (which specializes on alignment) compiles one variant for both.
        width = cdiv(len(lens), 4) * 4
        host = np.zeros(width + 1, dtype=np.int32)
        host[:len(lens)] = plan.order
        host[width] = plan.split_len
        buf = to_device(host, device)
        return buf[:len(lens)], buf[width:]
    return utils.step_plan(meta, f"decode_balance_{num_kv_heads}_{num_splits}", build)
