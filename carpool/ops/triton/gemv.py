"""Matrix-vector product for one-row decode steps: out[n] = sum_k x[k] * W[n, k] (+ bias[n]).

Why: at batch 1 a decode step is weight bandwidth, and cuBLAS reaches 93-95% of copy bandwidth on the
large projections but only 72-76% on the smaller q/k/v and o projections of an 8B model (it splits K and
adds a reduction kernel). Here each program streams BLOCK_N whole rows of W (contiguous in K) and
reduces them in registers: no split, no second kernel, one launch per projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.paged_kv import slot_row
from carpool.ops.triton.push_words import check_push_world, push_pairs, push_targets
from carpool.ops.triton.quant_gemv import _program_rows, _store_out
from carpool.ops.triton.utils import pdl_wait_then_release


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 2  # output rows per program
    block_k: int = 1024  # columns per loop step
    num_warps: int = 4
    num_stages: int = 3


def default_gemv_config(k: int, push: bool = False) -> GemvConfig:
    """Measured on H200s. Two rows per program was best or within 5% of best for every Llama-3-8B
    projection, whole or halved for TP=2 (benchmarks/bench_gemv.py, EXPERIMENTS.md run 16). Rows of
    up to 4096 are read in one step: under PDL the whole weight slice of a program is then loaded before
    it waits for x, and batch-1 decode ran 1.6% faster than with 1024-column steps (2048 was 5% slower;
    EXPERIMENTS.md run 24). Long rows (the down projection, K = 14336) take 2048-column steps with
    8 warps (4096 was 8% slower); so do rows of 4097-8192 (K = 7168: batch-1 decode 1.0-1.6% faster
    than with 1024-column steps and 4 warps, EXPERIMENTS.md run 48).
    push (gemv_push, o_proj and down_proj at TP=2): rows of 1025-2048 and 4097-8192 take 1024-column
    steps with 4 warps, with which pushing costs nothing (bench_gemv.py --push) and TP=2 batch-1 decode
    ran 3.0% faster than with the plain GEMV's configs (EXPERIMENTS.md run 53)."""
    if push and (1024 < k <= 2048 or 4096 < k <= 8192):
        return GemvConfig(block_k=1024)
    if k <= 4096:
        return GemvConfig(block_k=max(16, triton.next_power_of_2(k)))
    return GemvConfig(block_k=2048, num_warps=8)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, pair_offset, slot_ptrs, epoch_ptr, slot_stride,
                 pos_ptr, cos_sin_ptr, slot_map_ptr, k_cache_ptr, v_cache_ptr, stride_cs, stride_cb, stride_cp,
                 stride_ch, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SILU_PAIR: tl.constexpr, PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                 ROPE: tl.constexpr, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, USE_PDL: tl.constexpr):
    if SILU_PAIR:  # program p reads rows p (gate) and p + pair_offset (up); BLOCK_N == 2
        rows = tl.program_id(0) + tl.arange(0, BLOCK_N) * pair_offset
    elif ROPE:  # program p reads the rotate-half pair (i, i + HALF) of head p // HALF; BLOCK_N == 2
        head = tl.program_id(0) // HALF
        i = tl.program_id(0) % HALF
        rows = head * (2 * HALF) + i + tl.arange(0, BLOCK_N) * HALF
    else:
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    # The first weight tile is loaded before waiting for the kernel that writes x (utils: PDL), so
    # under PDL it streams while that kernel still runs.
    cols = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    # The step's position and slot come from its upload, which precedes every kernel of the step, and no
    # kernel writes them: safe to read before the wait (a device-side position update would need the wait).
    if ROPE:
        cos, sin, k_dst, v_dst, n_k, n_v = _rope_targets(pos_ptr, cos_sin_ptr, slot_map_ptr, k_cache_ptr,
                                                         v_cache_ptr, stride_cs, stride_cb, stride_cp, stride_ch,
                                                         head, i, Q_HEADS, KV_HEADS, HALF, PAGE_SIZE)
    pdl_wait_then_release(USE_PDL)
    if PUSH:
        peers, epoch = push_targets(slot_ptrs, epoch_ptr, WORLD)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if SILU_PAIR:
        # The same roundings as the two-kernel path: gate and up as the GEMV stores them, then
        # silu_and_mul's arithmetic (silu(gate) rounded before the multiply).
        out = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        is_gate = tl.arange(0, BLOCK_N) == 0
        gate = tl.sum(tl.where(is_gate, out, 0.0), axis=0)
        up = tl.sum(tl.where(is_gate, 0.0, out), axis=0)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + tl.program_id(0), (act.to(tl.float32) * up).to(out_ptr.dtype.element_ty))
    elif ROPE:
        # The same roundings as the GEMV followed by rope_and_store_kv: q and k as the GEMV stores them,
        # then [x1, x2] -> [x1 c - x2 s, x2 c + x1 s] in float32. v is stored as it is.
        y = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        first = tl.arange(0, BLOCK_N) == 0
        x1 = tl.sum(tl.where(first, y, 0.0), axis=0)
        x2 = tl.sum(tl.where(first, 0.0, y), axis=0)
        rotated = tl.where(first, x1 * cos - x2 * sin, x2 * cos + x1 * sin)
        y = tl.where(head < Q_HEADS + KV_HEADS, rotated, y).to(out_ptr.dtype.element_ty)
        pair = tl.arange(0, BLOCK_N)
        tl.store(out_ptr + rows, y, mask=pair < tl.where(head < Q_HEADS, BLOCK_N, 0))  # q rows only
        offs = pair * HALF
        tl.store(k_dst + offs, y.to(k_dst.dtype.element_ty), mask=pair < n_k)
        tl.store(v_dst + offs, y.to(v_dst.dtype.element_ty), mask=pair < n_v)
    else:
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)
    if PUSH:
        # This program's two outputs are pair [program] of the row (ops/triton/all_reduce_norm.py:
        # push exchange).
        bits = out.to(out_ptr.dtype.element_ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        pair = tl.sum(tl.where(tl.arange(0, BLOCK_N) == 0, bits, bits << 16), axis=0)
        push_pairs(pair, tl.program_id(0), None, peers, epoch, slot_stride, RANK, WORLD)


@triton.jit
def _rope_targets(pos_ptr, cos_sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, stride_cs, stride_cb, stride_cp,
                  stride_ch, head, i, Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                  PAGE_SIZE: tl.constexpr):
    """For a program of the fused q/k/v GEMV (ROPE): cos and sin of column i at the step's position,
    where its pair goes in the caches (k and v share strides: block, slot in block, head), and how many
    of its two values go to each: 2 for a k head's to the k cache, a v head's to the v cache, else 0
    (q heads, and every head of a padded step, slot < 0)."""
    pos = tl.load(pos_ptr).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + i)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + i)
    page, row, n_store = slot_row(slot_ptr, 0, 2, PAGE_SIZE)
    kv_head = tl.maximum(tl.where(head < Q_HEADS + KV_HEADS, head - Q_HEADS, head - Q_HEADS - KV_HEADS), 0)
    off = page * stride_cb + row * stride_cp + kv_head * stride_ch + i
    n_k = tl.where(head < Q_HEADS, 0, tl.where(head < Q_HEADS + KV_HEADS, n_store, 0))
    n_v = tl.where(head < Q_HEADS + KV_HEADS, 0, n_store)
    return cos, sin, k_cache_ptr + off, v_cache_ptr + off, n_k, n_v


@dataclass(frozen=True)
class RopeTargets:
    """What the fused q/k/v GEMV needs for RoPE and the KV-cache store (gemv_rope_and_store_kv)."""
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    num_heads: int
    num_kv_heads: int
    half: int


def _check(x: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    n, k = weight.shape
    if x.numel() != k or weight.stride(-1) != 1:
        raise ValueError(f"{name}: x must hold K={k} values and weight [N, K] be contiguous in K, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)} with strides {tuple(weight.stride())}")
    x = x.reshape(k)
    return x if x.stride(0) == 1 else x.contiguous()


def _launch(name: str, x: torch.Tensor, weight: torch.Tensor, out_cols: int, config: GemvConfig | None,
            block_n: int | None = None, bias: torch.Tensor | None = None, pair_offset: int = 0, silu_pair: bool = False,
            push: tuple[torch.Tensor, torch.Tensor, int, int, int] | None = None,
            rope: RopeTargets | None = None) -> torch.Tensor:
    """The one launch of _gemv_kernel behind gemv, gemv_push, gemv_silu_and_mul and
    gemv_rope_and_store_kv: programs of block_n rows (default: the config's) over weight [N, K]; returns
    out [1, out_cols] in x's dtype. push: (slot_ptrs, epoch, slot_stride, rank, world_size)."""
    n, k = weight.shape
    config = config or default_gemv_config(k, push is not None)
    block_n = block_n or config.block_n
    x = _check(x, weight, name)
    out = torch.empty(1, out_cols, dtype=x.dtype, device=x.device)
    slot_ptrs, epoch, slot_stride, rank, world_size = push or (out, out, 0, 0, 1)
    if rope is not None:
        cache = rope.k_cache
        r_args = (rope.positions, rope.cos_sin_cache, rope.slot_mapping, cache, rope.v_cache,
                  rope.cos_sin_cache.stride(0), cache.stride(0), cache.stride(1), cache.stride(2))
        q_heads, kv_heads, half, page_size = rope.num_heads, rope.num_kv_heads, rope.half, cache.shape[1]
    else:
        r_args, q_heads, kv_heads, half, page_size = (out, out, out, out, out, 0, 0, 0, 0), 0, 0, 1, 1
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0), pair_offset, slot_ptrs, epoch,
        slot_stride, *r_args, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=config.block_k,
        SILU_PAIR=silu_pair, PUSH=push is not None, RANK=rank, WORLD=world_size, ROPE=rope is not None,
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HALF=half, PAGE_SIZE=page_size, num_warps=config.num_warps,
        num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x [1, K] (or [K]) @ weight[N, K].T (+ bias) -> [1, N] in x's dtype; weight's last dim contiguous."""
    return _launch("gemv", x, weight, weight.shape[0], config, bias=bias)


def gemv_push(x: torch.Tensor, weight: torch.Tensor, slot_ptrs: torch.Tensor, epoch: torch.Tensor,
              slot_stride: int, rank: int, world_size: int, config: GemvConfig | None = None) -> torch.Tensor:
    """gemv(x, weight) -> [1, N] (this rank's partial sums), also written into every rank's push slots
    for `pushed_add_rms_norm` (ops/triton/all_reduce_norm.py) to reduce. Why: the partial sums cross
    NVLink while the GEMV still runs, instead of in an exchange after it. weight: 16-bit, N even."""
    n = weight.shape[0]
    if weight.dtype not in (torch.bfloat16, torch.float16) or x.dtype != weight.dtype or n % 2 or n // 2 > slot_stride:
        raise ValueError(f"gemv_push: expected 16-bit x and weight with an even N <= {2 * slot_stride}, got "
                         f"{x.dtype}, {weight.dtype} {tuple(weight.shape)}")
    check_push_world("gemv_push", world_size)
    return _launch("gemv_push", x, weight, n, config, block_n=2,
                   push=(slot_ptrs, epoch, slot_stride, rank, world_size))


def gemv_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) -> [1, d] for weight = [gate; up] of shape [2d, K] (a merged
    gate/up projection). Why: a batch-1 layer then has one kernel fewer in its dependent chain (no
    separate silu_and_mul launch and wait), with the weight traffic of the plain GEMV; the result equals
    gemv followed by silu_and_mul (same roundings)."""
    two_d = weight.shape[0]
    if two_d % 2:
        raise ValueError(f"gemv_silu_and_mul: weight must stack gate and up ([2d, K]), got {tuple(weight.shape)}")
    return _launch("gemv_silu_and_mul", x, weight, two_d // 2, config, block_n=2, pair_offset=two_d // 2,
                   silu_pair=True)


def gemv_rope_and_store_kv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                           num_kv_heads: int) -> torch.Tensor:
    """A batch-1 step's q/k/v projection (weight = [q; k; v] heads of head_dim rows, + bias) with
    rope_and_store_kv on its result (ops/triton/elementwise.py; no q/k norm) in one kernel: returns q
    [1, num_heads, head_dim], rotated, and writes the rotated k and v at the step's cache slot (none if
    it is < 0). Why: one kernel fewer in each layer's dependent chain, and the RoPE inputs (position,
    cos/sin, slot) are read while the weights stream. The same roundings as the two kernels: equal in the
    interpreter; compiled, the rotation's multiply-adds may contract differently (one bf16 ulp)."""
    n, k = weight.shape
    head_dim = cos_sin_cache.shape[-1]
    if (head_dim % 2 or n != (num_heads + 2 * num_kv_heads) * head_dim or k_cache.dim() != 4
            or k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape
            or v_cache.stride() != k_cache.stride() or k_cache.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1
            or cos_sin_cache.dtype != torch.float32 or positions.numel() != 1 or slot_mapping.numel() != 1):
        raise ValueError(
            f"gemv_rope_and_store_kv: expected weight [({num_heads} + 2 * {num_kv_heads}) * head_dim, K], "
            f"caches [blocks, page, {num_kv_heads}, head_dim] of equal strides, a float32 cos_sin_cache "
            f"[positions, head_dim] and one position and slot; got weight {tuple(weight.shape)}, caches "
            f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)}, cos_sin_cache {tuple(cos_sin_cache.shape)} "
            f"{cos_sin_cache.dtype}, {positions.numel()} positions, {slot_mapping.numel()} slots")
    rope = RopeTargets(positions, cos_sin_cache, slot_mapping, k_cache, v_cache, num_heads, num_kv_heads,
                       head_dim // 2)
    out = _launch("gemv_rope_and_store_kv", x, weight, n, None, block_n=2, bias=bias, rope=rope)
    return out[:, :num_heads * head_dim].view(1, num_heads, head_dim)


# -- several rows of x: small-batch decode steps and speculative verification (k + 1 query tokens) --------

MAX_GEMV_ROWS = 16  # rows of x the multi-row GEMV takes: one 16-row MMA tile, whatever M below it costs


@dataclass(frozen=True)
class GemvRowsConfig:
    """A multi-row GEMV's launch: BLOCK_N weight rows per program (SiLU-and-mul: half gate, half up rows),
    BLOCK_K columns per loop step, num_warps, num_stages (the loads feed tl.dot, so Triton pipelines
    them: num_stages - 1 steps of weights in flight per program)."""
    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name, value in (("block_n", self.block_n), ("block_k", self.block_k)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemvRowsConfig.{name} must be a power of two >= 16 (a tl.dot side), got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"GemvRowsConfig: num_warps must be 1-16 (a power of two) and num_stages >= 1, got "
                             f"{self.num_warps} and {self.num_stages}")


def default_gemv_rows_config() -> GemvRowsConfig:
    """Unmeasured on a GPU (benchmarks/bench_gemv.py --rows sweeps it against cuBLAS). 32 weight rows per
    program: 128 programs on the 4096-row projections (o, down) for 132 SMs, and the x tile (at most
    16 x BLOCK_K, only M rows of it loaded) at most half the weight tile. 256-column steps, 4 stages: 48 KiB
    of weights in flight per program. In the interpreter (CPU tests) programs are few and wide instead."""
    if utils.interpreting():
        return GemvRowsConfig(block_n=64, block_k=128, num_stages=1)
    return GemvRowsConfig()


@triton.jit
def _dot_rows(x, w, acc, F32: tl.constexpr):
    """acc + x @ w.T. F32: in float32 at full precision (float32 inputs, which tl.dot would round to tf32,
    and the interpreter, whose dot misreads bf16); the same value for 16-bit inputs, whose products are
    exact in float32 either way."""
    if F32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, pair_offset,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SILU_PAIR: tl.constexpr, F32: tl.constexpr, USE_PDL: tl.constexpr):
    rows, row_ok = _program_rows(N, pair_offset, BLOCK_N, SILU_PAIR)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    ms = tl.arange(0, BLOCK_M)
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm
    m_ok = (ms < M)[:, None]
    cols = tl.arange(0, BLOCK_K)
    # As the one-row GEMV: the first weight tile is loaded before waiting for the kernel that writes x.
    w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    pdl_wait_then_release(USE_PDL)
    x = tl.load(x_rows + cols[None, :], mask=m_ok & (cols < K)[None, :], other=0.0)
    acc = _dot_rows(x, w, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), F32)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = (cols < K)[None, :]
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0)
        x = tl.load(x_rows + cols[None, :], mask=m_ok & col_ok, other=0.0)
        acc = _dot_rows(x, w, acc, F32)
    _store_out(acc, b_ptr, out_ptr, rows, row_ok, M, stride_om, pair_offset, BLOCK_M, BLOCK_N, HAS_BIAS, SILU_PAIR)


def _launch_rows(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 config: GemvRowsConfig | None, silu_pair: bool) -> torch.Tensor:
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k or not 1 <= x.shape[0] <= MAX_GEMV_ROWS:
        raise ValueError(f"{name}: x must be [M <= {MAX_GEMV_ROWS}, {k}] for weight {tuple(weight.shape)}, got "
                         f"{tuple(x.shape)}")
    if weight.stride(1) != 1 or x.dtype != weight.dtype:
        raise ValueError(f"{name}: weight must be [N, K] contiguous in K and of x's dtype, got {weight.dtype} with "
                         f"strides {tuple(weight.stride())} for x {x.dtype}")
    if silu_pair and n % 2:
        raise ValueError(f"{name}: the weight must stack gate and up ([2d, K]), got {n} rows")
    x = x if x.stride(1) == 1 else x.contiguous()
    config = config or default_gemv_rows_config()
    m = x.shape[0]
    out = utils.empty_output((m, n // 2 if silu_pair else n), x.dtype, x.device)
    programs = triton.cdiv(n // 2, config.block_n // 2) if silu_pair else triton.cdiv(n, config.block_n)
    _gemv_rows_kernel[(programs,)](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        n // 2 if silu_pair else 0, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, HAS_BIAS=bias is not None, SILU_PAIR=silu_pair,
        F32=x.dtype == torch.float32 or utils.interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def gemv_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              config: GemvRowsConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ weight[N, K].T (+ bias) -> [M, N] in x's dtype (float32 accumulation).

    Why: a step of a few rows (small-batch decode, speculative verification of k + 1 tokens) is still
    weight bandwidth, where cuBLAS splits K and adds a reduction kernel on the smaller projections. Each
    program streams BLOCK_N whole rows of W once for all rows of x, multiplying on the tensor cores (x
    padded to one 16-row tile): no split, no second kernel, launched under PDL like the one-row GEMV."""
    return _launch_rows("gemv_rows", x, weight, bias, config, silu_pair=False)


def gemv_rows_silu_and_mul(x: torch.Tensor, weight: torch.Tensor,
                           config: GemvRowsConfig | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) -> [M <= 16, d] for weight = [gate; up] of shape [2d, K], pairing rows as
    quant_gemv's SiLU-and-mul GEMVs (a program's BLOCK_N / 2 gate rows and their up rows); equals
    gemv_rows followed by silu_and_mul (same roundings), with no [M, 2d] intermediate."""
    return _launch_rows("gemv_rows_silu_and_mul", x, weight, None, config, silu_pair=True)
