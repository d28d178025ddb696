"""Quantized-weight matrix-vector products for decode steps of 1-8 rows: out[m, n] = sum_k x[m, k] W[n, k].

Why: a small-batch decode step is weight bandwidth, so the bytes per weight set its time: e4m3 weights
are half of bf16's, 4-bit ones a quarter plus their group scales. Like the bf16 GEMV (gemv.py) each
program streams BLOCK_N whole rows of W (contiguous in K) and reduces them in registers, one launch per
projection, no split-K; here the weights are dequantized in registers (e4m3 -> float32, or 4-bit
nibbles -> floats by mantissa tricks) and every weight tile serves all BLOCK_M rows of x, so batch 8
reads the weights once. Activations are not quantized (W8A16 / W4A16 arithmetic, float32 accumulation):
the step saves the activation-quantization kernel.

Unlike the bf16 GEMV these kernels are bound by instruction issue before bytes (a weight is 1 or 0.5
bytes but ~3-4 instructions per row of x), so scales apply once per output (per channel) or once per
128-column slice (blocks, int4 groups), never per weight, each row of x is reduced against a tile as
its products form (no float32 tile-sized accumulator), and programs are wide (8-16 rows) so their fixed
work spreads over more weights. default_quant_gemv_config gives the budgets.

Weight layouts: FP8 weight [N, K] float8_e4m3fn with scales per output channel ([N]) or per 128x128
block ([ceil(N/128), ceil(K/128)]); int4 in carpool's layout (quantization/formats.py): packed
[N, K/8] int32, scales / zeros [N, K/G].

PDL (utils.py): as the bf16 GEMV, the first weight tile is loaded before waiting for the kernel that
writes x.

SiLU-and-mul (`fp8_gemv_silu_and_mul`, `int4_gemv_silu_and_mul`): the same kernels over a merged
[gate; up] weight with the pairing of gemv.gemv_silu_and_mul: a program's BLOCK_N rows are BLOCK_N / 2
gate rows and the up rows d below them, and it writes silu(gate) * up for those BLOCK_N / 2 columns. One
kernel fewer in a decode step's dependent chain and no [M, 2d] intermediate, for the same weight bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.fp8 import e4m3_pairs_to
from carpool.ops.triton.utils import pdl_wait_then_release

MAX_GEMV_ROWS = 8  # rows of x above which the GEMM kernels take over
FP8_BLOCK = 128  # the block of block-scaled FP8 weights (rows and columns)
# int4 words a thread of the one-row kernel holds side by side (one 16-byte load), summed in its registers
ONE_ROW_SLICE_WORDS = 4
# e4m3 weights a thread of the FP8 one-row kernel holds side by side (four e4m3 pairs, one 8-byte load): 8, so
# that the bf16 x they multiply is one 16-byte load in the same layout
ONE_ROW_FP8_SLICE = 8


@dataclass(frozen=True)
class QuantGemvConfig:
    """A quantized GEMV's launch: BLOCK_N weight rows per program, BLOCK_K columns per loop step, num_warps.
    Triton does not pipeline loads that feed no dot (no cp.async; num_stages changes nothing), so the
    bytes a program has in flight are one step's tile, BLOCK_N x BLOCK_K weights, and an SM's are that
    times the programs its registers hold (65536 / (registers x 32 x num_warps))."""
    block_n: int = 8  # weight rows per program (SiLU-and-mul: half gate rows, half up rows)
    block_k: int = 1024  # weight columns per loop step
    num_warps: int = 4
    # one row of x through the one-row kernel (partial sums per thread through the loop, the next step's
    # weights loaded before this step's arithmetic; FP8: bf16 x and an even K, else the kernel of 1-8 rows);
    # False: the kernel of 1-8 rows
    one_row: bool = True

    def __post_init__(self) -> None:
        for name, value, low in (("block_n", self.block_n, 1), ("block_k", self.block_k, 16)):
            if value < low or value & (value - 1):
                raise ValueError(f"QuantGemvConfig.{name} must be a power of two >= {low}, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"QuantGemvConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")

    def tile_bytes(self, int4: bool) -> int:
        """Weight bytes one loop step of a program loads (excluding scales)."""
        return self.block_n * self.block_k // (2 if int4 else 1)


def default_quant_gemv_config(m: int, k: int, int4: bool) -> QuantGemvConfig:
    """Chosen from two budgets per SM of an H100 (132 SMs, ~3 TB/s), with registers
    and instruction counts from compiling for sm_90 (scripts/quant_compile_check.py, cuobjdump):

    - bytes in flight: the bf16 GEMV (gemv.py) reaches copy bandwidth with 16 KiB of weights per program
      and step at 128 registers a thread, 4 programs an SM: ~64 KiB in flight per SM;
    - instruction issue: 4 warp-instructions per clock per SM. A weight moves in 1 (FP8) or 0.5 (INT4)
      bytes but costs ~3-4 instructions per row of x (convert, multiply-add, its share of the
      reduction), so the quantized GEMVs are issue-bound first: the old kernels (2 rows x 4096 columns,
      8 warps, 14336 programs on gate_up) issued ~85M (FP8) and ~96M (INT4, plus I2F conversions at 1/8
      rate) warp-instructions, ~92 us at 1.75 GHz: they measured 103 and 222 us against a 40 and 21 us
      roofline. Fewer, larger programs amortize the per-program work (address setup, the cross-warp
      reduction, the epilogue) and x's loads over more weights.

    FP8, one row of x: 8 rows x 1024 columns (8 KiB per step), 64 registers, so 8 programs (64 KiB) an
    SM, ~20M warp-instructions on gate_up (~22 us of issue under a 40 us roofline). More rows of x
    multiply each weight again: 16 rows x 512 columns (~126 registers, 4 programs, 32 KiB in flight), where
    at 4-8 rows the multiply-adds, not the bytes, set the time (~50 / ~90 us of issue on gate_up).
    INT4 above one row: 16 rows x 512 columns.

    INT4, one row of x: the one-row kernel, 8 rows x 4096 columns (16 KiB of words per step, as the bf16
    GEMV's tile; 184 registers with Triton 3.6, no spills). Its 1-8-row kernel at 16 x 1024 (the former
    batch-1 default) measured 1.39x bf16's ms/token on an H100 (4.6x its byte limit): compiled for sm_90
    with Triton 3.6 (the GPU image's) its loop has 43 block barriers and ~7.2 instructions per weight, the
    one-row kernel's none and ~5.1 (Triton 3.9: none and ~5.1). The one-row kernel is not yet timed on a
    GPU. FP8 keeps its measured 1-8-row kernel at batch 1 (0.67x bf16) until the FP8 one-row kernel is
    timed: with Triton 3.6 the latter's loop costs ~4.1 instructions per weight (e4m3 pairs converted by
    one cvt each) and has no barrier, the former's ~4.4 with 7 barriers and 21 shuffles.
    benchmarks/bench_quant.py --sweep (--batch-one: both kernels at batch 1) times the neighbours of these
    per projection and batch. In the interpreter (CPU tests) programs are few and wide instead."""
    if utils.interpreting():  # CPU tests: each program costs ~10 ms of Python per op, whatever its size
        return QuantGemvConfig(block_n=64, block_k=min(256, max(64, triton.next_power_of_2(k))), one_row=int4)
    if m == 1:
        if int4:
            return QuantGemvConfig(block_n=8, block_k=4096)
        return QuantGemvConfig(block_n=8, block_k=1024, one_row=False)
    return QuantGemvConfig(block_n=16, block_k=512)


@triton.jit
def _program_rows_of(j, N, pair_offset, BLOCK_N: tl.constexpr, SILU_PAIR: tl.constexpr):
    """(weight rows, which of them exist) of this program's local rows j (0 .. BLOCK_N - 1, any shape):
    BLOCK_N consecutive rows, or with SILU_PAIR the BLOCK_N / 2 gate rows of its output columns followed
    by their up rows, pair_offset (= d) further."""
    if SILU_PAIR:
        HALF_N: tl.constexpr = BLOCK_N // 2
        out_cols = tl.program_id(0) * HALF_N + j % HALF_N
        return out_cols + (j // HALF_N) * pair_offset, out_cols < pair_offset
    rows = tl.program_id(0) * BLOCK_N + j
    return rows, rows < N


@triton.jit
def _program_rows(N, pair_offset, BLOCK_N: tl.constexpr, SILU_PAIR: tl.constexpr):
    """_program_rows_of for all BLOCK_N local rows, in order."""
    return _program_rows_of(tl.arange(0, BLOCK_N), N, pair_offset, BLOCK_N, SILU_PAIR)


@triton.jit
def _store_silu_and_mul(out, out_ptr, ms, m_ok, stride_om, d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out [BLOCK_M, BLOCK_N] float32 over SILU_PAIR rows (gate half, then up half) -> silu(gate) * up at
    this program's BLOCK_N / 2 output columns, with the roundings of the GEMV followed by silu_and_mul
    (elementwise.py): gate and up as the GEMV stores them, silu(gate) rounded before the multiply."""
    HALF_N: tl.constexpr = BLOCK_N // 2
    y = out.to(out_ptr.dtype.element_ty).to(tl.float32)
    gate, up = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, HALF_N)), (0, 2, 1)))
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    cols = tl.program_id(0) * HALF_N + tl.arange(0, HALF_N)
    tl.store(out_ptr + ms.to(tl.int64)[:, None] * stride_om + cols[None, :],
             (act.to(tl.float32) * up).to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (cols < d)[None, :])


@triton.jit
def _store_out(out, b_ptr, out_ptr, rows, row_ok, M, stride_om, pair_offset, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_PAIR: tl.constexpr):
    """The epilogue shared by both GEMVs: out [BLOCK_M, BLOCK_N] float32 (+ bias) -> the output rows."""
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if SILU_PAIR:
        _store_silu_and_mul(out, out_ptr, ms, m_ok, stride_om, pair_offset, BLOCK_M, BLOCK_N)
    else:
        tl.store(out_ptr + ms.to(tl.int64)[:, None] * stride_om + rows[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def _fp8_step(acc, w, x_ptr, s_ptr, rows, row_ok, M, k0, K, stride_xm, stride_sn, BLOCK_M: tl.constexpr,
              SUB: tl.constexpr, NSUB: tl.constexpr, BLOCK_SCALES: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x[:, k0:k0+BLOCK_K] @ tile.T for the e4m3 tile w [BLOCK_N, NSUB, SUB]
    (BLOCK_K = NSUB * SUB columns). Each row of x is reduced against the tile as its products form, so
    no float32 [BLOCK_N, BLOCK_K] tensor is held. Block scales: each SUB-column slice lies in one 128x128
    block, so its sum is scaled once (one multiply per slice and row, not per weight)."""
    cols = k0 + tl.arange(0, NSUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]
    wf = w.to(tl.float32)
    if BLOCK_SCALES:
        starts = k0 + tl.arange(0, NSUB) * SUB
        s = tl.load(s_ptr + (rows // 128)[:, None] * stride_sn + (starts // 128)[None, :],
                    mask=row_ok[:, None] & (starts < K)[None, :], other=0.0)
    ms = tl.arange(0, BLOCK_M)
    for m in tl.static_range(BLOCK_M):
        x = tl.load(x_ptr + m * stride_xm + cols, mask=cols < tl.where(m < M, K, 0), other=0.0).to(tl.float32)
        part = tl.sum(wf * x[None, :, :], axis=2)  # [BLOCK_N, NSUB]
        if BLOCK_SCALES:
            part = part * s
        acc += tl.where(ms[:, None] == m, tl.sum(part, axis=1)[None, :], 0.0)
    return acc


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_sn,
                     pair_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
                     NSUB: tl.constexpr, BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU_PAIR: tl.constexpr, USE_PDL: tl.constexpr):
    BLOCK_K: tl.constexpr = NSUB * SUB
    rows, row_ok = _program_rows(N, pair_offset, BLOCK_N, SILU_PAIR)
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * stride_wn
    offs = tl.arange(0, NSUB)[:, None] * SUB + tl.arange(0, SUB)[None, :]  # a step's columns, [NSUB, SUB]
    w = tl.load(w_rows + offs[None, :, :], mask=row_ok[:, None, None] & (offs < K)[None, :, :], other=0.0)
    pdl_wait_then_release(USE_PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _fp8_step(acc, w, x_ptr, s_ptr, rows, row_ok, M, 0, K, stride_xm, stride_sn, BLOCK_M, SUB, NSUB,
                    BLOCK_SCALES)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + offs
        w = tl.load(w_rows + cols[None, :, :], mask=row_ok[:, None, None] & (cols < K)[None, :, :], other=0.0)
        acc = _fp8_step(acc, w, x_ptr, s_ptr, rows, row_ok, M, k0, K, stride_xm, stride_sn, BLOCK_M, SUB, NSUB,
                        BLOCK_SCALES)
    if not BLOCK_SCALES:  # one scale per output channel: applied once to the sum
        acc = acc * tl.load(s_ptr + rows, mask=row_ok, other=0.0)[None, :]
    _store_out(acc, b_ptr, out_ptr, rows, row_ok, M, stride_om, pair_offset, BLOCK_M, BLOCK_N, HAS_BIAS, SILU_PAIR)


@triton.jit
def _fp8_gemv_one_row_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K, stride_wn, stride_sn, pair_offset,
                             BLOCK_N: tl.constexpr, SUB: tl.constexpr, NSUB: tl.constexpr,
                             BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_PAIR: tl.constexpr,
                             ASM: tl.constexpr, USE_PDL: tl.constexpr):
    """fp8_gemv for one row of x (a batch-1 decode step), as _int4_gemv_one_row_kernel: partial sums per
    thread through the loop, one reduction at the end, the next step's weights loaded before this step's
    arithmetic, and the weights loaded as a flat [rows x slices, SUB / 2] tile of e4m3 pairs (int16) so
    that each thread holds the same SUB = 8 consecutive columns of every row. x is read as bf16 pairs
    (int32), one 16-byte load in the same thread-to-column layout, so it needs no exchange between
    threads. x_ptr / w_ptr: int32 / int16 views (K even, the weight's row stride even)."""
    BLOCK_K: tl.constexpr = NSUB * SUB
    HALF: tl.constexpr = SUB // 2
    KP = K // 2  # pairs of columns
    f = tl.arange(0, BLOCK_N * NSUB)  # (row, slice) pairs, flattened
    sub_f = f % NSUB
    rows_f, row_ok_f = _program_rows_of(f // NSUB, N, pair_offset, BLOCK_N, SILU_PAIR)
    w_rows = w_ptr + rows_f.to(tl.int64)[:, None] * (stride_wn // 2)
    offs = sub_f[:, None] * HALF + tl.arange(0, HALF)[None, :]  # each pair's column pairs in a step
    w = tl.load(w_rows + offs, mask=row_ok_f[:, None] & (offs < KP), other=0)
    x_offs = tl.arange(0, NSUB)[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [NSUB, HALF]
    pdl_wait_then_release(USE_PDL)
    # per-channel scales apply to the sums, so the products accumulate weight by weight (one multiply-add
    # each); block scales change along the row, so each step's sums are scaled before they accumulate
    acc = tl.zeros([BLOCK_N, NSUB, 1 if BLOCK_SCALES else HALF], dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K // 2):
        nxt = k0 + BLOCK_K // 2 + offs
        following = tl.load(w_rows + nxt, mask=row_ok_f[:, None] & (nxt < KP), other=0)
        cols = k0 + x_offs
        xp = tl.load(x_ptr + cols, mask=cols < KP, other=0)  # bf16 pairs: column 2c low, 2c + 1 high
        x_low = (xp << 16).to(tl.float32, bitcast=True)[None, :, :]
        x_high = (xp & -65536).to(tl.float32, bitcast=True)[None, :, :]
        w_low, w_high = e4m3_pairs_to(w, tl.float32, ASM)
        w_low = tl.reshape(w_low, (BLOCK_N, NSUB, HALF))
        w_high = tl.reshape(w_high, (BLOCK_N, NSUB, HALF))
        if BLOCK_SCALES:  # an 8-column slice lies in one 128x128 block
            starts_f = 2 * k0 + sub_f * SUB
            s = tl.reshape(tl.load(s_ptr + (rows_f // 128) * stride_sn + starts_f // 128,
                                   mask=row_ok_f & (starts_f < K), other=0.0), (BLOCK_N, NSUB, 1))
            acc += tl.sum(w_low * x_low + w_high * x_high, axis=2, keep_dims=True) * s
        else:
            acc += w_low * x_low
            acc += w_high * x_high
        w = following
    rows, row_ok = _program_rows(N, pair_offset, BLOCK_N, SILU_PAIR)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if not BLOCK_SCALES:
        out = out * tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    _store_out(out[None, :], b_ptr, out_ptr, rows, row_ok, 1, 0, pair_offset, 1, BLOCK_N, HAS_BIAS, SILU_PAIR)


@triton.jit
def dequantize_int4_tile(words, s_rows, z_rows, w_idx, mask, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """int32 words [BLOCK_N, BLOCK_K / 8] of carpool's int4 layout (words w_idx of each row) -> weights
    [BLOCK_N, BLOCK_K] float32, (q - zero) * scale, column 8j + i from nibble i of word j. s_rows / z_rows:
    [BLOCK_N, 1] pointers to each row's scales / zeros (zero = 8 without zeros); `mask` [BLOCK_N, BLOCK_K / 8]
    says which words exist. Shared by the int4 GEMV, GEMM and fused MoE kernels."""
    BLOCK_W: tl.constexpr = BLOCK_K // 8
    # Every 8-column word lies in one group (GROUP is a multiple of 8): scales and zeros per word.
    group = (w_idx * 8) // GROUP
    s = tl.load(s_rows + group[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_rows + group[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.full([BLOCK_N, BLOCK_W], 8.0, dtype=tl.float32)
    shifts = tl.arange(0, 8) * 4
    q = ((words[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)  # [BLOCK_N, BLOCK_W, 8]
    return tl.reshape((q - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))


@triton.jit
def _int4_step(acc, words, x_ptr, s_ptr, z_ptr, rows64, row_ok, M, k0, K, stride_xm, stride_sn, stride_zn,
               GROUP: tl.constexpr, BLOCK_M: tl.constexpr, SUBW: tl.constexpr, NSUB: tl.constexpr,
               HAS_ZEROS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x[:, k0:k0+BLOCK_K] @ W.T for the int32 words [BLOCK_N, NSUB, SUBW] of
    one step (BLOCK_K = 8 * NSUB * SUBW columns; column 8j + i is nibble i of word j).

    The GEMV is instruction-bound before it is byte-bound (a weight is half a byte), so a weight costs
    three instructions per row of x and nothing else:
    - a nibble becomes a float without a conversion instruction (I2F issues at 1/8 of the FMA rate): OR-ed
      into the mantissa of 2^23 (one LOP3 with the mask) and minus 2^23 (one add) it is q * 16^p exactly,
      p its position (nibbles 0-4 in the word, 5-7 in the word shifted right by 12, one shift per word);
      the x it multiplies is pre-scaled by 16^-p (exact, a power of two) once per step for all rows;
    - the eight nibbles of a word are multiply-added into one float32 per word and row of x (a chain of
      FMAs in registers, in the words' own layout: no [.., 8] tensor, no layout conversion);
    - each SUBW-word slice lies in one group, so its scale and zero apply once per slice and row:
      sum (q - z) s x = s (sum q x - z sum x)."""
    SUB: tl.constexpr = SUBW * 8
    starts = k0 + tl.arange(0, NSUB) * SUB
    sub_ok = starts < K  # (K is a multiple of GROUP, GROUP of SUB: a slice is wholly in K or out)
    g_ok = row_ok[:, None] & sub_ok[None, :]
    s = tl.load(s_ptr + rows64[:, None] * stride_sn + (starts // GROUP)[None, :], mask=g_ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + rows64[:, None] * stride_zn + (starts // GROUP)[None, :], mask=g_ok,
                    other=0.0).to(tl.float32)
    else:
        z = tl.full([1, NSUB], 8.0, dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    word_cols = starts[:, None] + tl.arange(0, SUBW)[None, :] * 8  # [NSUB, SUBW]: column of each word's nibble 0
    x_rows = x_ptr + ms[:, None, None] * stride_xm
    x_ok = (ms < M)[:, None, None] & sub_ok[None, :, None]
    high = words >> 12
    qx = tl.zeros([BLOCK_M, words.shape[0], NSUB, SUBW], dtype=tl.float32)
    x_sum = tl.zeros([BLOCK_M, NSUB, SUBW], dtype=tl.float32)
    for i in tl.static_range(8):
        if i < 5:
            q = ((words & (0xF << (4 * i))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # q 16^i
            x_scale = 1.0 / (16 ** i)
        else:
            q = ((high & (0xF << (4 * (i - 3)))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            x_scale = 1.0 / (16 ** (i - 3))
        x = tl.load(x_rows + (word_cols + i)[None, :, :], mask=x_ok, other=0.0).to(tl.float32)
        x_sum += x
        qx += q[None, :, :, :] * (x * x_scale)[:, None, :, :]
    qx = tl.sum(qx, axis=3)  # [BLOCK_M, BLOCK_N, NSUB]
    x_sum = tl.sum(x_sum, axis=2)  # [BLOCK_M, NSUB]
    return acc + tl.sum(s[None, :, :] * (qx - z[None, :, :] * x_sum[:, None, :]), axis=2)


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                      stride_sn, stride_zn, pair_offset, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, SUBW: tl.constexpr, NSUB: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SILU_PAIR: tl.constexpr, USE_PDL: tl.constexpr):
    BLOCK_W: tl.constexpr = NSUB * SUBW  # int32 words per row and step
    rows, row_ok = _program_rows(N, pair_offset, BLOCK_N, SILU_PAIR)
    rows64 = rows.to(tl.int64)
    w_rows = w_ptr + rows64[:, None, None] * stride_wn
    offs = tl.arange(0, NSUB)[:, None] * SUBW + tl.arange(0, SUBW)[None, :]  # a step's words, [NSUB, SUBW]
    words = tl.load(w_rows + offs[None, :, :], mask=row_ok[:, None, None] & (offs < K // 8)[None, :, :], other=0)
    pdl_wait_then_release(USE_PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _int4_step(acc, words, x_ptr, s_ptr, z_ptr, rows64, row_ok, M, 0, K, stride_xm, stride_sn, stride_zn,
                     GROUP, BLOCK_M, SUBW, NSUB, HAS_ZEROS)
    for k0 in range(8 * BLOCK_W, K, 8 * BLOCK_W):
        w_idx = k0 // 8 + offs
        words = tl.load(w_rows + w_idx[None, :, :], mask=row_ok[:, None, None] & (w_idx < K // 8)[None, :, :],
                        other=0)
        acc = _int4_step(acc, words, x_ptr, s_ptr, z_ptr, rows64, row_ok, M, k0, K, stride_xm, stride_sn,
                         stride_zn, GROUP, BLOCK_M, SUBW, NSUB, HAS_ZEROS)
    _store_out(acc, b_ptr, out_ptr, rows, row_ok, M, stride_om, pair_offset, BLOCK_M, BLOCK_N, HAS_BIAS, SILU_PAIR)


@triton.jit
def _x_slices(x_ptr, x_cols, x_ok, SUBW: tl.constexpr):
    """x at columns x_cols + 8 j (j < SUBW, SUBW in 1, 2, 4) as [NSUB, SUBW]: one 1-D load per j, joined
    along a new last dim, so the SUBW values sit in one thread's registers beside the words they
    multiply (a strided 2-D load would let the compiler spread them across threads)."""
    if SUBW == 1:
        return tl.reshape(tl.load(x_ptr + x_cols, mask=x_ok, other=0.0).to(tl.float32), (x_cols.shape[0], 1))
    elif SUBW == 2:
        return tl.join(tl.load(x_ptr + x_cols, mask=x_ok, other=0.0).to(tl.float32),
                       tl.load(x_ptr + x_cols + 8, mask=x_ok, other=0.0).to(tl.float32))
    else:
        # join's new dim is the last: [n, p, q] of join(join(x0, x2), join(x1, x3)) is x_{2p+q}
        even = tl.join(tl.load(x_ptr + x_cols, mask=x_ok, other=0.0).to(tl.float32),
                       tl.load(x_ptr + x_cols + 16, mask=x_ok, other=0.0).to(tl.float32))
        odd = tl.join(tl.load(x_ptr + x_cols + 8, mask=x_ok, other=0.0).to(tl.float32),
                      tl.load(x_ptr + x_cols + 24, mask=x_ok, other=0.0).to(tl.float32))
        return tl.reshape(tl.join(even, odd), (x_cols.shape[0], 4))


@triton.jit
def _int4_row_step(acc, words, x_ptr, s_ptr, z_ptr, rows_f, row_ok_f, sub_f, w0, KW, stride_sn, stride_zn,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SUBW: tl.constexpr, NSUB: tl.constexpr,
                   HAS_ZEROS: tl.constexpr):
    """acc [BLOCK_N, NSUB, SUBW] += per word, the products of its 8 weights with x's columns, scaled by its
    group's scale (zero subtracted): for the int32 words [BLOCK_N, NSUB, SUBW] at word columns
    w0 .. w0 + NSUB SUBW, a slice of SUBW words lying in one group. Elementwise in each thread: no
    shuffle, no shared memory, no barrier inside the loop. The nibble-to-float trick is _int4_step's,
    with the exponent OR-ed into each word once, so that a nibble costs one AND with one immediate.
    rows_f / row_ok_f / sub_f: the program's row, whether it exists, and the slice, per (row, slice) pair,
    flattened (see the kernel)."""
    word_f = w0 + sub_f * SUBW  # the first word of each (row, slice)
    ok_f = row_ok_f & (word_f < KW)
    group_f = (word_f * 8) // GROUP
    s = tl.reshape(tl.load(s_ptr + rows_f * stride_sn + group_f, mask=ok_f, other=0.0).to(tl.float32),
                   (BLOCK_N, NSUB))[:, :, None]
    if HAS_ZEROS:
        z = tl.reshape(tl.load(z_ptr + rows_f * stride_zn + group_f, mask=ok_f, other=0.0).to(tl.float32),
                       (BLOCK_N, NSUB))[:, :, None]
    else:
        z = 8.0
    sub_w = w0 + tl.arange(0, NSUB) * SUBW
    x_cols = sub_w * 8  # column of nibble 0 of each slice's first word
    x_ok = sub_w < KW
    low = (words & 0xFFFFF) | 0x4B000000
    high = ((words >> 12) & 0xFFF00) | 0x4B000000
    x_sum = _x_slices(x_ptr, x_cols, x_ok, SUBW)
    qx = ((low & 0x4B00000F).to(tl.float32, bitcast=True) - 8388608.0) * x_sum[None, :, :]
    for i in tl.static_range(1, 8):
        if i < 5:
            q = (low & (0x4B000000 | (0xF << (4 * i)))).to(tl.float32, bitcast=True) - 8388608.0  # q 16^i
            x_scale = 1.0 / (16 ** i)
        else:
            q = (high & (0x4B000000 | (0xF << (4 * (i - 3))))).to(tl.float32, bitcast=True) - 8388608.0
            x_scale = 1.0 / (16 ** (i - 3))
        x = _x_slices(x_ptr, x_cols + i, x_ok, SUBW)
        x_sum += x
        qx += q * (x * x_scale)[None, :, :]
    return acc + s * (qx - z * x_sum[None, :, :])


@triton.jit
def _int4_gemv_one_row_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn,
                              pair_offset, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, SUBW: tl.constexpr,
                              NSUB: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                              SILU_PAIR: tl.constexpr, USE_PDL: tl.constexpr):
    """int4_gemv for one row of x (a batch-1 decode step). Unlike _int4_gemv_kernel, which reduces every
    step across threads (shuffles and barriers in the loop), each thread keeps its own partial sums
    through the loop and the program reduces once at the end, as the bf16 GEMV does; and the next step's
    words are loaded before this step's arithmetic, so a program's loads stay in flight while it
    computes (Triton pipelines no load that feeds no dot).

    Layout: the words are loaded as a 2-D [BLOCK_N * NSUB, SUBW] tile, (row, slice) flattened, then
    reshaped to [BLOCK_N, NSUB, SUBW]. Triton lays out a 2-D load with threads along the flattened dim
    and a thread's SUBW words side by side, so each thread holds the same slice of every row, and the x
    values that slice multiplies are loaded once for all rows. (A 3-D load leaves the thread order of
    rows and slices to the compiler: Triton 3.6 spread rows across threads, and x then crossed threads
    through shared memory for every nibble.)"""
    BLOCK_W: tl.constexpr = NSUB * SUBW  # int32 words per row and step
    KW = K // 8
    f = tl.arange(0, BLOCK_N * NSUB)  # (row, slice) pairs, flattened
    sub_f = f % NSUB
    rows_f, row_ok_f = _program_rows_of(f // NSUB, N, pair_offset, BLOCK_N, SILU_PAIR)
    rows_f = rows_f.to(tl.int64)
    w_rows = w_ptr + rows_f[:, None] * stride_wn
    offs = sub_f[:, None] * SUBW + tl.arange(0, SUBW)[None, :]  # each pair's words within a step
    words = tl.load(w_rows + offs, mask=row_ok_f[:, None] & (offs < KW), other=0)
    pdl_wait_then_release(USE_PDL)
    acc = tl.zeros([BLOCK_N, NSUB, SUBW], dtype=tl.float32)
    for w0 in range(0, KW, BLOCK_W):
        nxt = w0 + BLOCK_W + offs
        following = tl.load(w_rows + nxt, mask=row_ok_f[:, None] & (nxt < KW), other=0)
        acc = _int4_row_step(acc, tl.reshape(words, (BLOCK_N, NSUB, SUBW)), x_ptr, s_ptr, z_ptr, rows_f,
                             row_ok_f, sub_f, w0, KW, stride_sn, stride_zn, GROUP, BLOCK_N, SUBW, NSUB, HAS_ZEROS)
        words = following
    rows, row_ok = _program_rows(N, pair_offset, BLOCK_N, SILU_PAIR)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    _store_out(out, b_ptr, out_ptr, rows, row_ok, 1, 0, pair_offset, 1, BLOCK_N, HAS_BIAS, SILU_PAIR)


def _check_x(x: torch.Tensor, k: int, name: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != k or not 1 <= x.shape[0] <= MAX_GEMV_ROWS:
        raise ValueError(f"{name}: x must be [M <= {MAX_GEMV_ROWS}, {k}], got {tuple(x.shape)}")
    return x if x.stride(1) == 1 else x.contiguous()


def _check_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, name: str) -> torch.Tensor:
    n, k = weight.shape
    x = _check_x(x, k, name)
    if weight.dtype != torch.float8_e4m3fn or weight.stride(1) != 1:
        raise ValueError(f"{name}: weight must be float8_e4m3fn [N, K] contiguous in K, got {weight.dtype} "
                         f"with strides {tuple(weight.stride())}")
    blocks = weight_scale.dim() == 2
    expected = (triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)) if blocks else (n,)
    if tuple(weight_scale.shape) != expected or weight_scale.stride(-1) != 1:
        raise ValueError(f"{name}: weight_scale must be [{n}] or [{expected if blocks else '(N/128, K/128)'}] "
                         f"for weight {tuple(weight.shape)}, got {tuple(weight_scale.shape)}")
    return x


def _launch_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                config: QuantGemvConfig | None, silu_pair: bool) -> torch.Tensor:
    n, k = weight.shape
    m = x.shape[0]
    blocks = weight_scale.dim() == 2
    config = _config(config, m, k, False, silu_pair)
    out = utils.empty_output((m, n // 2 if silu_pair else n), x.dtype, x.device)
    pairs = (k % 2 == 0 and weight.stride(0) % 2 == 0 and x.dtype == torch.bfloat16 and x.data_ptr() % 4 == 0
             and weight.data_ptr() % 2 == 0)  # x and the weight viewable as bf16 / e4m3 pairs
    if m == 1 and config.one_row and pairs:
        sub = min(ONE_ROW_FP8_SLICE, config.block_k)
        _fp8_gemv_one_row_kernel[(_num_programs(n, config, silu_pair),)](
            x.view(torch.int32), weight.view(torch.int16), weight_scale,
            bias if bias is not None else weight_scale, out, n, k, weight.stride(0),
            weight_scale.stride(0) if blocks else 1, n // 2 if silu_pair else 0, BLOCK_N=config.block_n, SUB=sub,
            NSUB=config.block_k // sub, BLOCK_SCALES=blocks, HAS_BIAS=bias is not None, SILU_PAIR=silu_pair,
            ASM=not utils.interpreting(), num_warps=config.num_warps, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
        return out
    sub = min(FP8_BLOCK, config.block_k) if blocks else config.block_k  # columns under one scale
    _fp8_gemv_kernel[(_num_programs(n, config, silu_pair),)](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k, x.stride(0),
        weight.stride(0), out.stride(0), weight_scale.stride(0) if blocks else 1, n // 2 if silu_pair else 0,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=config.block_n, SUB=sub, NSUB=config.block_k // sub,
        BLOCK_SCALES=blocks, HAS_BIAS=bias is not None, SILU_PAIR=silu_pair, num_warps=config.num_warps,
        USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def _config(config: QuantGemvConfig | None, m: int, k: int, int4: bool, silu_pair: bool) -> QuantGemvConfig:
    config = config or default_quant_gemv_config(m, k, int4)
    if silu_pair and (config.block_n < 2 or config.block_n & (config.block_n - 1)):
        raise ValueError(f"block_n: a SiLU-and-mul GEMV pairs gate and up rows, so it must be a power of two >= 2, "
                         f"got {config.block_n}")
    return config


def _num_programs(n: int, config: QuantGemvConfig, silu_pair: bool) -> int:
    return triton.cdiv(n // 2, config.block_n // 2) if silu_pair else triton.cdiv(n, config.block_n)


def _check_gate_up(n: int, name: str) -> None:
    if n % 2:
        raise ValueError(f"{name}: the weight must stack gate and up ([2d, K]), got {n} rows")


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: QuantGemvConfig | None = None) -> torch.Tensor:
    """x [M <= 8, K] @ (weight * scale).T (+ bias) -> [M, N] in x's dtype. weight: e4m3 [N, K], K
    contiguous; weight_scale: float32 [N] (per channel) or [ceil(N/128), ceil(K/128)] (128x128 blocks)."""
    x = _check_fp8(x, weight, weight_scale, "fp8_gemv")
    return _launch_fp8(x, weight, weight_scale, bias, config, silu_pair=False)


def fp8_gemv_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          config: QuantGemvConfig | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) -> [M, d] for an FP8 weight [gate; up] of shape [2d, K] (scales as
    fp8_gemv's); equals fp8_gemv followed by silu_and_mul (same roundings). config.block_n: rows per
    program, gate and up halves (an even power of two)."""
    x = _check_fp8(x, weight, weight_scale, "fp8_gemv_silu_and_mul")
    _check_gate_up(weight.shape[0], "fp8_gemv_silu_and_mul")
    return _launch_fp8(x, weight, weight_scale, None, config, silu_pair=True)


def check_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               name: str) -> tuple[int, int]:
    """(N, K) of int4 weights in carpool's layout; ValueError unless shapes and strides fit."""
    n, k = packed.shape[0], packed.shape[1] * 8
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.stride(1) != 1:
        raise ValueError(f"{name}: packed weight must be int32 [N, K/8] contiguous in K, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if group_size % 8 or k % group_size:
        raise ValueError(f"{name}: group size {group_size} must be a multiple of 8 dividing K={k}")
    if tuple(scales.shape) != (n, k // group_size) or scales.stride(1) != 1:
        raise ValueError(f"{name}: scales must be [{n}, {k // group_size}], got {tuple(scales.shape)}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.stride(1) != 1):
        raise ValueError(f"{name}: zeros must be [{n}, {k // group_size}], got {tuple(zeros.shape)}")
    return n, k


def _launch_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None, config: QuantGemvConfig | None, silu_pair: bool,
                 name: str) -> torch.Tensor:
    n, k = check_int4(packed, scales, zeros, group_size, name)
    x = _check_x(x, k, name)
    if silu_pair:
        _check_gate_up(n, name)
    m = x.shape[0]
    config = _config(config, m, k, True, silu_pair)
    out = utils.empty_output((m, n // 2 if silu_pair else n), x.dtype, x.device)
    if m == 1 and config.one_row:
        subw = min(ONE_ROW_SLICE_WORDS, config.block_k // 8, (group_size & -group_size) // 8)
        _int4_gemv_one_row_kernel[(_num_programs(n, config, silu_pair),)](
            x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
            n, k, packed.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0,
            n // 2 if silu_pair else 0, GROUP=group_size, BLOCK_N=config.block_n, SUBW=subw,
            NSUB=config.block_k // 8 // subw, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
            SILU_PAIR=silu_pair, num_warps=config.num_warps, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
        return out
    subw = min(config.block_k, group_size & -group_size) // 8  # words under one scale: a power of two
    _int4_gemv_kernel[(_num_programs(n, config, silu_pair),)](
        x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        m, n, k, x.stride(0), packed.stride(0), out.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, n // 2 if silu_pair else 0, GROUP=group_size,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=config.block_n, SUBW=subw, NSUB=config.block_k // 8 // subw,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SILU_PAIR=silu_pair, num_warps=config.num_warps,
        USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, bias: torch.Tensor | None = None,
              config: QuantGemvConfig | None = None) -> torch.Tensor:
    """x [M <= 8, K] @ W.T (+ bias) -> [M, N] in x's dtype, W = (q - zero) * scale dequantized in
    registers from carpool's int4 layout (zero = 8 when `zeros` is None)."""
    return _launch_int4(x, packed, scales, zeros, group_size, bias, config, False, "int4_gemv")


def int4_gemv_silu_and_mul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                           group_size: int, config: QuantGemvConfig | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) -> [M, d] for an int4 weight [gate; up] of 2d rows in carpool's layout;
    equals int4_gemv followed by silu_and_mul (same roundings). config.block_n as fp8_gemv_silu_and_mul's."""
    return _launch_int4(x, packed, scales, zeros, group_size, None, config, True, "int4_gemv_silu_and_mul")
