"""Quantized GEMMs for prefill and batches above the GEMV's 8 rows, and FP8 activation quantization.

- `quantize_fp8_act`: x -> (e4m3 x, float32 scales): dynamic per token (one scale per row), per token
  and 128-column group (the activation side of 128x128 block weights), or one static scale.
- `fp8_gemm`: W8A8 e4m3 GEMM on the tensor cores (`tl.dot` of e4m3 tiles, float32 accumulation), scales
  per token / group for x and per channel / 128x128 block for W. With block scales each K step is one
  128-column group, scaled as it is accumulated.
- `fp8_scaled_mm`: the same product through `torch._scaled_mm` (cuBLASLt, row-wise scales), for
  per-channel weights; `fp8_gemm_backend` picks one of the two by shape (benchmarks/bench_quant.py
  measures both).
- `int4_gemm`: W4A16: 4-bit weights in carpool's layout dequantized tile by tile into x's dtype, then
  `tl.dot` with float32 accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.fp8 import E4M3_MAX, to_e4m3
from carpool.ops.triton.quant_gemv import FP8_BLOCK, check_int4, dequantize_int4_tile
from carpool.ops.triton.utils import pdl_enter

MIN_ACT_AMAX = tl.constexpr(1e-12)  # as ops/torch_ref/quant.py: an all-zero row still gets a finite scale


@dataclass(frozen=True)
class QuantGemmConfig:
    block_m: int = 64
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8  # programs of GROUP_M row tiles walk the column tiles together (L2 reuse of W)
    num_warps: int = 8
    num_stages: int = 3


def default_quant_gemm_config(m: int, n: int, k: int, dtype: torch.dtype, int4: bool = False) -> QuantGemmConfig:
    """Unmeasured defaults (common Hopper tile shapes); FP8 keeps block_k at 128, the scale block. INT4
    dequantizes its tile in registers: 64-column steps and 8 warps, which compile for sm_90 without
    spills (128-197 registers; 128-column steps with 4 warps spill). float32 (correctness runs on CPU):
    small tiles."""
    if dtype == torch.float32:
        return QuantGemmConfig(block_m=16, block_n=32, block_k=128 if k >= 128 else 64, num_warps=4,
                               num_stages=1)
    if int4:
        return QuantGemmConfig(block_m=64 if m <= 64 else 128, block_n=128, block_k=64, num_warps=8,
                               num_stages=4 if m <= 64 else 3)
    if m <= 64:
        return QuantGemmConfig(block_m=64 if m > 32 else 32, block_n=128, block_k=128, num_warps=4, num_stages=4)
    return QuantGemmConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)


# --- activation quantization ----------------------------------------------------------------------------

@triton.jit
def _quant_act_kernel(x_ptr, xq_ptr, scale_ptr, K, stride_xm, stride_qm, stride_sm, static_scale_ptr,
                      GROUP: tl.constexpr, STATIC: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr,
                      USE_PDL: tl.constexpr):
    """One program per (row, group of GROUP columns): scale = max |x| / 448 (or the static scale),
    x / scale saturated to e4m3's range. GROUP >= K: one group per row (per token)."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    ok = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_scale_ptr)
    else:
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), MIN_ACT_AMAX) / E4M3_MAX
        tl.store(scale_ptr + row * stride_sm + g, scale)
    tl.store(xq_ptr + row * stride_qm + cols, to_e4m3(x / scale, xq_ptr, SOFTWARE_ROUNDING),
             mask=ok)


def quantize_fp8_act(x: torch.Tensor, group_size: int | None = None,
                     static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of torch_ref.quantize_fp8_activations: (e4m3 [M, K], float32 scales [M, 1] per token,
    [M, ceil(K / group_size)] per group, or static_scale itself ([1]))."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_fp8_act: x must be [M, K] contiguous in K, got {tuple(x.shape)}")
    m, k = x.shape
    xq = utils.empty_output((m, k), torch.float8_e4m3fn, x.device)
    if static_scale is not None:
        if static_scale.numel() != 1 or static_scale.dtype != torch.float32:
            raise ValueError(f"quantize_fp8_act: static_scale must be one float32 value, got "
                             f"{static_scale.dtype} {tuple(static_scale.shape)}")
        scale = static_scale.reshape(1)
        group = triton.next_power_of_2(k)
        groups = 1
    else:
        group = triton.next_power_of_2(k) if group_size is None else group_size
        if group & (group - 1):
            raise ValueError(f"quantize_fp8_act: group_size must be a power of two, got {group_size}")
        groups = triton.cdiv(k, group)
        scale = utils.empty_output((m, groups), torch.float32, x.device)
    if m:
        _quant_act_kernel[(m, groups)](x, xq, scale, k, x.stride(0), xq.stride(0), scale.stride(0), scale,
                                       GROUP=group, STATIC=static_scale is not None,
                                       SOFTWARE_ROUNDING=utils.interpreting(), num_warps=4 if group <= 2048 else 8,
                                       USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return xq, scale


# --- FP8 W8A8 GEMM ---------------------------------------------------------------------------------------------

@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, GROUP_M row tiles sharing each column tile in turn."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_asm, stride_wn,
                     stride_wsn, stride_cm, A_SCALES: tl.constexpr, BLOCK_SCALES: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, USE_PDL: tl.constexpr):
    """A_SCALES: 0 one static scale, 1 one per row, 2 one per row and BLOCK_K (= 128) columns.
    BLOCK_SCALES: W's scales per 128x128 block (else per output channel)."""
    pdl_enter(USE_PDL)
    tile_m, tile_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None]  # [BLOCK_K, BLOCK_N] view of W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BLOCK_SCALES:
            kb = k0 // BLOCK_K
            sa = tl.load(as_ptr + rm * stride_asm + kb, mask=m_ok, other=0.0)
            sw = tl.load(ws_ptr + (rn // 128) * stride_wsn + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, w) * sa[:, None] * sw[None, :]
        else:
            acc = tl.dot(a, w, acc)
    if not BLOCK_SCALES:
        if A_SCALES == 0:
            sa = tl.load(as_ptr + tl.zeros([BLOCK_M], dtype=tl.int32))
        else:
            sa = tl.load(as_ptr + rm * stride_asm, mask=m_ok, other=0.0)
        sw = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
        acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _check_fp8_operands(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                        weight_scale: torch.Tensor) -> tuple[int, int, int, bool]:
    m, k = xq.shape
    n = weight.shape[0]
    if xq.dtype != torch.float8_e4m3fn or weight.dtype != torch.float8_e4m3fn or weight.shape[1] != k:
        raise ValueError(f"fp8 GEMM: expected e4m3 x [M, K] and weight [N, K], got {xq.dtype} {tuple(xq.shape)} "
                         f"and {weight.dtype} {tuple(weight.shape)}")
    if xq.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("fp8 GEMM: x and weight must be contiguous in K")
    blocks = weight_scale.dim() == 2
    if blocks:
        if tuple(weight_scale.shape) != (triton.cdiv(n, FP8_BLOCK), triton.cdiv(k, FP8_BLOCK)):
            raise ValueError(f"fp8 GEMM: block weight_scale must be [{triton.cdiv(n, FP8_BLOCK)}, "
                             f"{triton.cdiv(k, FP8_BLOCK)}], got {tuple(weight_scale.shape)}")
        if tuple(x_scale.shape) != (m, triton.cdiv(k, FP8_BLOCK)):
            raise ValueError(f"fp8 GEMM: block weights need x scales per 128 columns [{m}, "
                             f"{triton.cdiv(k, FP8_BLOCK)}], got {tuple(x_scale.shape)}")
    else:
        if tuple(weight_scale.shape) != (n,):
            raise ValueError(f"fp8 GEMM: channel weight_scale must be [{n}], got {tuple(weight_scale.shape)}")
        if tuple(x_scale.shape) not in ((1,), (m, 1)):
            raise ValueError(f"fp8 GEMM: x scales must be [1] (static) or [{m}, 1] (per token), got "
                             f"{tuple(x_scale.shape)}")
    return m, n, k, blocks


def fp8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             out_dtype: torch.dtype, bias: torch.Tensor | None = None,
             config: QuantGemmConfig | None = None) -> torch.Tensor:
    """(xq * x_scale) @ (weight * weight_scale).T (+ bias) -> [M, N] out_dtype; the twin of
    torch_ref.w8a8_linear. Scales: x one static value, per row [M, 1], or per row and 128 columns
    (with block weights); weight per channel [N] or per 128x128 block."""
    m, n, k, blocks = _check_fp8_operands(xq, x_scale, weight, weight_scale)
    config = config or default_quant_gemm_config(m, n, k, out_dtype)
    if blocks and config.block_k != FP8_BLOCK:
        raise ValueError(f"fp8_gemm: block-scaled weights need block_k = {FP8_BLOCK}, got {config.block_k}")
    out = utils.empty_output((m, n), out_dtype, xq.device)
    if m == 0:
        return out
    a_scales = 2 if blocks else (1 if x_scale.dim() == 2 else 0)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _fp8_gemm_kernel[grid](
        xq, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k, xq.stride(0),
        x_scale.stride(0) if x_scale.dim() == 2 else 0, weight.stride(0),
        weight_scale.stride(0) if blocks else 1, out.stride(0), A_SCALES=a_scales, BLOCK_SCALES=blocks,
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages, USE_PDL=utils.pdl(),
        launch_pdl=utils.pdl())
    return out


def fp8_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_gemm for per-channel weights through torch._scaled_mm (cuBLASLt, row-wise scales; Hopper or
    newer, bf16 output, K and N multiples of 16). weight [N, K] row-major is W^T column-major, which is
    the layout _scaled_mm wants for its second operand."""
    m, n, k, blocks = _check_fp8_operands(xq, x_scale, weight, weight_scale)
    if blocks:
        raise ValueError("fp8_scaled_mm: block-scaled weights run through fp8_gemm")
    scale_a = x_scale.reshape(-1, 1).expand(m, 1).contiguous() if x_scale.numel() == 1 else x_scale
    return torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=weight_scale.reshape(1, n), bias=bias,
                            out_dtype=out_dtype)


# Shapes where torch._scaled_mm measured faster than fp8_gemm for per-channel weights: (max M, N, K)
# triples, filled from benchmarks/bench_quant.py's "fp8_gemm_backend" section. Empty until measured:
# cuBLASLt everywhere it can run.
TRITON_FP8_GEMM_SHAPES: tuple[tuple[int, int, int], ...] = ()


def fp8_gemm_backend(m: int, n: int, k: int, block_scales: bool, out_dtype: torch.dtype) -> str:
    """"triton" (fp8_gemm) or "scaled_mm" (torch._scaled_mm) for an [M, K] x [K, N] FP8 product:
    block-scaled weights and shapes _scaled_mm cannot run (K or N not a multiple of 16, an output other
    than bf16) take Triton; the rest take _scaled_mm unless a measured entry of TRITON_FP8_GEMM_SHAPES says Triton
    is faster there."""
    if block_scales or k % 16 or n % 16 or out_dtype != torch.bfloat16:  # (row-wise scales: bf16 output)
        return "triton"
    if any(m <= mm and n == nn and k == kk for mm, nn, kk in TRITON_FP8_GEMM_SHAPES):
        return "triton"
    return "scaled_mm"


# --- int4 W4A16 GEMM -------------------------------------------------------------------------------------------

@triton.jit
def _int4_gemm_kernel(a_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn,
                      stride_zn, stride_cm, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    BLOCK_W: tl.constexpr = BLOCK_K // 8
    tile_m, tile_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BLOCK_W)
    s_rows = s_ptr + rn64[:, None] * stride_sn
    z_rows = z_ptr + rn64[:, None] * stride_zn
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs + k0, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0)
        w_idx = k0 // 8 + rw
        w_ok = n_ok[:, None] & (w_idx < K // 8)[None, :]
        words = tl.load(w_ptr + rn64[:, None] * stride_wn + w_idx[None, :], mask=w_ok, other=0)  # [BLOCK_N, BLOCK_W]
        w = dequantize_int4_tile(words, s_rows, z_rows, w_idx, w_ok, GROUP, BLOCK_N, BLOCK_K, HAS_ZEROS).to(a.dtype)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, bias: torch.Tensor | None = None,
              config: QuantGemmConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) -> [M, N] in x's dtype, W dequantized tile by tile from carpool's int4
    layout into x's dtype (the twin of torch_ref.int4_linear)."""
    n, k = check_int4(packed, scales, zeros, group_size, "int4_gemm")
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"int4_gemm: x must be [M, {k}] contiguous in K, got {tuple(x.shape)}")
    m = x.shape[0]
    config = config or default_quant_gemm_config(m, n, k, x.dtype, int4=True)
    if config.block_k < 16 or config.block_k & (config.block_k - 1):
        raise ValueError(f"int4_gemm: block_k must be a power of two >= 16, got {config.block_k}")
    out = utils.empty_output((m, n), x.dtype, x.device)
    if m == 0:
        return out
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _int4_gemm_kernel[grid](
        x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, m, n,
        k, x.stride(0), packed.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0,
        out.stride(0), GROUP=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=config.num_warps,
        num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out
