"""Quantized-weight matrix-vector products for decode steps of 1-8 rows: out[m, n] = sum_k x[m, k] W[n, k].

Why: a small-batch decode step is weight bandwidth, so the bytes per weight set its time: e4m3 weights
are half of bf16's, 4-bit ones a quarter plus their group scales. Like the bf16 GEMV (gemv.py) each
program streams BLOCK_N whole rows of W (contiguous in K) and reduces them in registers, one launch per
projection, no split-K; here the weights are dequantized in registers (e4m3 -> float32, or 4-bit
(q - zero) * scale) and every weight tile serves all BLOCK_M rows of x, so batch 8 reads the weights
once. Activations are not quantized (W8A16 / W4A16 arithmetic, float32 accumulation): at these batch
sizes the multiply is free, and the step saves the activation-quantization kernel.

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
from carpool.ops.triton.utils import pdl_wait_then_release

MAX_GEMV_ROWS = 8  # rows of x above which the GEMM kernels take over
FP8_BLOCK = 128  # the block of block-scaled FP8 weights (rows and columns)


@dataclass(frozen=True)
class QuantGemvConfig:
    block_n: int = 2  # output rows per program
    block_k: int = 1024  # weight columns per loop step
    num_warps: int = 4
    num_stages: int = 3


def default_quant_gemv_config(m: int, k: int, int4: bool) -> QuantGemvConfig:
    """Unmeasured defaults, derived from the bf16 GEMV's measured ones (gemv.py): two rows per program
    and whole rows per step up to 4096 columns at one row of x; each further row of x multiplies the
    float32 partial products a program holds (BLOCK_M x BLOCK_N x BLOCK_K), so the step shrinks to keep
    them at 8192 per program. benchmarks/bench_quant.py sweeps these (`--sweep`). In the interpreter
    (CPU tests) programs are few and wide instead."""
    block_m = triton.next_power_of_2(max(1, m))
    limit = max(256, 4096 // block_m)
    block_k = min(limit, max(64 if int4 else 16, triton.next_power_of_2(k)))
    if utils.interpreting():  # CPU tests: each program costs ~10 ms of Python per op, whatever its size
        return QuantGemvConfig(block_n=64, block_k=min(block_k, 256), num_warps=4)
    # 8 warps once a program holds 4096 float32 products per row: compiled for sm_90 (scripts/
    # quant_compile_check.py), 4 warps then take 184-210 registers (int4, block-scaled FP8), 8 take 80-128.
    return QuantGemvConfig(block_n=2, block_k=block_k, num_warps=8 if k > 4096 or block_m * block_k >= 4096 else 4)


@triton.jit
def _program_rows(N, pair_offset, BLOCK_N: tl.constexpr, SILU_PAIR: tl.constexpr):
    """(weight rows, which of them exist) of this program: BLOCK_N consecutive rows, or with SILU_PAIR the
    BLOCK_N / 2 gate rows of its output columns followed by their up rows, pair_offset (= d) further."""
    if SILU_PAIR:
        HALF_N: tl.constexpr = BLOCK_N // 2
        j = tl.arange(0, BLOCK_N)
        out_cols = tl.program_id(0) * HALF_N + j % HALF_N
        return out_cols + (j // HALF_N) * pair_offset, out_cols < pair_offset
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < N


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
def _fp8_tile(acc, w, s_ptr, x_rows, rows, row_ok, m_ok, k0, K, stride_sn, BLOCK_K: tl.constexpr,
              BLOCK_SCALES: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N, BLOCK_K] += x[:, k0:k0+BLOCK_K] times the e4m3 tile w, in float32."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    wf = w.to(tl.float32)
    if BLOCK_SCALES:  # one scale per 128x128 block: applied to each weight before the sum
        s = tl.load(s_ptr + (rows // 128)[:, None] * stride_sn + (cols // 128)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        wf = wf * s
    x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return acc + x[:, None, :] * wf[None, :, :]


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_sn,
                     pair_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_PAIR: tl.constexpr,
                     USE_PDL: tl.constexpr):
    rows, row_ok = _program_rows(N, pair_offset, BLOCK_N, SILU_PAIR)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    cols = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    pdl_wait_then_release(USE_PDL)
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc = _fp8_tile(acc, w, s_ptr, x_rows, rows, row_ok, m_ok, 0, K, stride_sn, BLOCK_K, BLOCK_SCALES)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
        acc = _fp8_tile(acc, w, s_ptr, x_rows, rows, row_ok, m_ok, k0, K, stride_sn, BLOCK_K, BLOCK_SCALES)
    out = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if not BLOCK_SCALES:  # one scale per output channel: applied once to the sum
        out = out * tl.load(s_ptr + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if SILU_PAIR:
        _store_silu_and_mul(out, out_ptr, ms, m_ok, stride_om, pair_offset, BLOCK_M, BLOCK_N)
    else:
        tl.store(out_ptr + ms.to(tl.int64)[:, None] * stride_om + rows[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & row_ok[None, :])


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
def _int4_tile(acc, words, s_ptr, z_ptr, x_rows, rows64, row_ok, m_ok, k0, K, stride_sn, stride_zn,
               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ZEROS: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N, BLOCK_K] += x[:, k0:k0+BLOCK_K] times the tile of int32 words [BLOCK_N,
    BLOCK_K / 8], dequantized in float32: (q - zero) * scale."""
    BLOCK_W: tl.constexpr = BLOCK_K // 8
    w_idx = k0 // 8 + tl.arange(0, BLOCK_W)
    w_ok = row_ok[:, None] & (w_idx < K // 8)[None, :]
    w = dequantize_int4_tile(words, s_ptr + rows64[:, None] * stride_sn, z_ptr + rows64[:, None] * stride_zn, w_idx,
                             w_ok, GROUP, BLOCK_N, BLOCK_K, HAS_ZEROS)
    cols = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    return acc + x[:, None, :] * w[None, :, :]


@triton.jit
def _int4_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                      stride_sn, stride_zn, pair_offset, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SILU_PAIR: tl.constexpr, USE_PDL: tl.constexpr):
    BLOCK_W: tl.constexpr = BLOCK_K // 8  # int32 words per row and step
    rows, row_ok = _program_rows(N, pair_offset, BLOCK_N, SILU_PAIR)
    rows64 = rows.to(tl.int64)
    w_rows = w_ptr + rows64[:, None] * stride_wn
    words_i = tl.arange(0, BLOCK_W)
    words = tl.load(w_rows + words_i[None, :], mask=row_ok[:, None] & (words_i < K // 8)[None, :], other=0)
    pdl_wait_then_release(USE_PDL)
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc = _int4_tile(acc, words, s_ptr, z_ptr, x_rows, rows64, row_ok, m_ok, 0, K, stride_sn, stride_zn, GROUP,
                     BLOCK_N, BLOCK_K, HAS_ZEROS)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w_idx = k0 // 8 + words_i
        words = tl.load(w_rows + w_idx[None, :], mask=row_ok[:, None] & (w_idx < K // 8)[None, :], other=0)
        acc = _int4_tile(acc, words, s_ptr, z_ptr, x_rows, rows64, row_ok, m_ok, k0, K, stride_sn, stride_zn,
                         GROUP, BLOCK_N, BLOCK_K, HAS_ZEROS)
    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if SILU_PAIR:
        _store_silu_and_mul(out, out_ptr, ms, m_ok, stride_om, pair_offset, BLOCK_M, BLOCK_N)
    else:
        tl.store(out_ptr + ms.to(tl.int64)[:, None] * stride_om + rows[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & row_ok[None, :])


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
    _fp8_gemv_kernel[(_num_programs(n, config, silu_pair),)](
        x, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k, x.stride(0),
        weight.stride(0), out.stride(0), weight_scale.stride(0) if blocks else 1, n // 2 if silu_pair else 0,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_SCALES=blocks,
        HAS_BIAS=bias is not None, SILU_PAIR=silu_pair, num_warps=config.num_warps, num_stages=config.num_stages,
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
    if config.block_k < 8 or config.block_k & (config.block_k - 1):
        raise ValueError(f"{name}: block_k must be a power of two >= 8, got {config.block_k}")
    out = utils.empty_output((m, n // 2 if silu_pair else n), x.dtype, x.device)
    _int4_gemv_kernel[(_num_programs(n, config, silu_pair),)](
        x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out,
        m, n, k, x.stride(0), packed.stride(0), out.stride(0), scales.stride(0),
        zeros.stride(0) if zeros is not None else 0, n // 2 if silu_pair else 0, GROUP=group_size,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, SILU_PAIR=silu_pair, num_warps=config.num_warps,
        num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
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
