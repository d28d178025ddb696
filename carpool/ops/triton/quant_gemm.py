"""Quantized GEMMs for prefill and batches above the GEMV's 8 rows, and FP8 activation quantization.

- `quantize_fp8_act`: x -> (e4m3 x, float32 scales): dynamic per token (one scale per row), per token
  and 128-column group (the activation side of 128x128 block weights), or one static scale. Group
  scales are stored M-major ([M, G] with strides (1, M)): the layout torch._scaled_mm's 1x128 block
  scaling requires, and one contiguous load per K step in fp8_gemm.
- `fp8_gemm`: W8A8 e4m3 GEMM on the tensor cores (`tl.dot` of e4m3 tiles, float32 accumulation), scales
  per token / group for x and per channel / 128x128 block for W. With block scales each K step is one
  128-column group, scaled as it is accumulated.
- `fp8_scaled_mm`: the same product through `torch._scaled_mm` (cuBLASLt): row-wise scales for
  per-channel weights; 1x128 x 128x128 block scaling (cuBLASLt 12.9+, sm_90) for block weights where
  this torch and GPU have it (`block_scaled_mm_rows`, probed once per device against fp8_gemm).
- `fp8_linear`: activation quantization then the GEMM `fp8_gemm_backend` picks (what Fp8LinearMethod
  runs above the GEMV's rows).
- `int4_gemm`: W4A16 fused: 4-bit weights dequantized tile by tile in registers, `tl.dot` in x's dtype
  with float32 accumulation, optionally split along K (`QuantGemmConfig.split_k`) and computed
  transposed (`swap_ab`). `int4_dequant_mm`: the whole weight dequantized to x's dtype, then cuBLAS;
  `int4_linear` picks one of the two by rows (`int4_gemm_backend`).

Why the int4 kernel looks as it does (Hopper, group 128, decode batches of 16-256 rows):
- A decode-sized product reads each weight once, so its time is the weight bytes (N x K / 2) over the
  bandwidth, as long as the dequantization keeps up: per weight a shift, a mask-or, two adds and a
  multiply in float32 and half a conversion to bf16, with no per-element scale loads. The K step never
  straddles a group (block_k divides the group), so one scale and zero per output row and step suffice,
  loaded as a [BLOCK_N] vector; the integer nibble becomes a float by OR-ing it into the mantissa of
  2^23 and subtracting 2^23 (exact; an int-to-float conversion is a quarter-rate instruction on sm_90).
- Output tiles alone are too few: at batch 64, o_proj and down_proj have 32 tiles of 128 channels for
  132 SMs. `split_k` gives each tile several programs, each over a contiguous run of K steps (>= 4, so
  the num_stages-deep load pipeline has something to overlap), writing float32 partial sums that a
  second small kernel adds in a fixed order with the bias: deterministic, unlike atomics.
- `swap_ab`: the tile is computed as out^T = W x^T, so the dequantized weights are the MMA's left
  operand, which Hopper's wgmma may read from registers (the right one must be in shared memory), and
  the few tokens are the MMA's N dimension (8-256 on sm_90, while M is 64 per warpgroup).
- Bytes in flight per stage at the batch-64 default (128 channels x 64 K x 64 tokens): 4 KiB of packed
  weights and 8 KiB of activations; 4 stages of two programs keep 96 KiB of loads outstanding per SM.
- Prefill: dequantizing a [128, 128] tile per K step costs about as much ALU time as its 128-token MMA,
  so from INT4_DEQUANT_MM_MIN_ROWS rows the weight is dequantized once into a bf16 copy (0.5 + 2 + 2
  bytes per weight of traffic: ~0.3 ms for a Llama-3-8B layer) and multiplied by cuBLAS at bf16 speed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.fp8 import store_e4m3_rows
from carpool.ops.triton.quant_gemv import FP8_BLOCK, check_int4
from carpool.ops.triton.utils import pdl_enter

logger = logging.getLogger(__name__)

H100_SMS = 132  # SM count assumed where no CUDA device is queried (the interpreter, compile checks)
MIN_K_STEPS_PER_SPLIT = 4  # a split-K program's K steps, at least: its load pipeline needs steps to overlap
MAX_INT4_BLOCK_K = 128
# Rows from which int4_linear dequantizes the whole weight and calls cuBLAS (benchmarks/bench_quant.py's
# "backends" section times both sides at 256..8192 rows): the dequantization's ~4.5 bytes per weight cost
# as much as the fused kernel's extra ALU time at about this many rows.
INT4_DEQUANT_MM_MIN_ROWS = 1024
# Rows from which block-scaled FP8 takes cuBLASLt's block scaling where it is available (bench_quant.py's
# "backends" section times both at 16..8192 rows).
FP8_BLOCK_SCALED_MM_MIN_ROWS = 9


@dataclass(frozen=True)
class QuantGemmConfig:
    """Launch parameters of the Triton GEMMs (benchmarks/bench_quant.py --sweep times them).

    block_m: rows of x (tokens) per program; block_n: output channels (weight rows); block_k: the K
    step (FP8 with block scales: 128, the scale block; int4: a divisor of the group for one scale per
    row and step); group_m: programs of group_m row tiles walk the column tiles together (L2 reuse of W).
    split_k (int4): programs per output tile, each reducing its own run of K steps (module docstring).
    swap_ab (int4): compute out^T = W x^T, the weights as the MMA's left operand (module docstring)."""
    block_m: int = 64
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    split_k: int = 1
    swap_ab: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"QuantGemmConfig.{name} must be a power of two >= 16 (tl.dot), got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"QuantGemmConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.split_k < 1 or self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"QuantGemmConfig: split_k, group_m and num_stages must be >= 1, got {self.split_k}, "
                             f"{self.group_m}, {self.num_stages}")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (H100_SMS off CUDA: the interpreter and compile checks)."""
    if device.type != "cuda":
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def int4_block_k(group_size: int, k: int) -> int:
    """The int4 K step: the largest power of two <= MAX_INT4_BLOCK_K dividing the group (one scale row per
    step), or per-channel weights' 128; 64 (scales gathered per column) for groups with no such divisor
    >= 16 (tl.dot's minimum)."""
    if group_size >= k:
        return MAX_INT4_BLOCK_K
    step = min(group_size & -group_size, MAX_INT4_BLOCK_K)
    return step if step >= 16 else 64


def split_k_for(tiles: int, k_steps: int, sms: int) -> int:
    """Programs per output tile: 1 when the tiles fill the SMs; else enough for about two programs per SM,
    each with at least MIN_K_STEPS_PER_SPLIT steps, rounded so that no split is empty. (A wave and a
    fraction is left alone: splitting would add partial-sum traffic for a smaller tail.)"""
    if tiles >= sms:
        return 1
    split = max(1, min(triton.cdiv(2 * sms, tiles), k_steps // MIN_K_STEPS_PER_SPLIT))
    return triton.cdiv(k_steps, triton.cdiv(k_steps, split))


def default_quant_gemm_config(m: int, n: int, k: int, dtype: torch.dtype, int4: bool = False, group_size: int = 128,
                              block_scales: bool = False, sms: int = H100_SMS) -> QuantGemmConfig:
    """Unmeasured defaults from Hopper's tile shapes (benchmarks/bench_quant.py --sweep measures them).

    FP8: block_k 128, the scale block. Up to 64 rows a 32/64-row tile with 4 warps and 4 stages; above,
    per-channel 128x128 tiles with 8 warps; block scales 64x128 with 4 warps, which hold the K step's
    product and the accumulator in ~130 registers, so two or three programs share an SM and one's scale
    multiply overlaps another's MMA (a 128x128 tile with 8 warps fits one program per SM).
    INT4 (module docstring): 64-column K steps (a divisor of group 128); batches up to 64 rows swap_ab
    with 128-channel tiles and 4 stages, 8 warps at 64 rows (32 weights dequantized per thread per step);
    larger ones 128x128 tiles, 8 warps, 3 stages; split_k from split_k_for. Compiled for sm_90
    (scripts/quant_compile_check.py) these take 110-128 registers and no spills, so two programs share an
    SM (the dequantization of one overlaps the other's MMA and loads); 128-column K steps take 142-188.
    The unpacking interleaves each word with itself (8 copies in one thread's registers, then a shift
    per column): unpacking through a [BLOCK_N, BLOCK_K / 8, 8] tensor instead gave a layout of one
    column and 64 rows per thread, 255 registers and 750-950 bytes of spills per thread.
    float32 (correctness runs on CPU): small tiles."""
    if int4:
        block_k = min(int4_block_k(group_size, k), 64)
        if dtype == torch.float32:
            return QuantGemmConfig(block_m=16, block_n=32, block_k=block_k, num_warps=4, num_stages=1)
        if m <= 64:
            block_m, swap, stages = max(16, triton.next_power_of_2(m)), True, 4
            warps = 8 if block_m == 64 else 4
        else:
            block_m, swap, warps, stages = 128, False, 8, 3
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 128)
        return QuantGemmConfig(block_m=block_m, block_n=128, block_k=block_k, num_warps=warps, num_stages=stages,
                               split_k=split_k_for(tiles, triton.cdiv(k, block_k), sms), swap_ab=swap)
    if dtype == torch.float32:
        return QuantGemmConfig(block_m=16, block_n=32, block_k=128 if k >= 128 else 64, num_warps=4,
                               num_stages=1)
    if m <= 64:
        return QuantGemmConfig(block_m=64 if m > 32 else 32, block_n=128, block_k=128, num_warps=4, num_stages=4)
    if block_scales:
        return QuantGemmConfig(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4)
    return QuantGemmConfig(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)


# --- activation quantization ----------------------------------------------------------------------------

@triton.jit
def _quant_act_kernel(x_ptr, xq_ptr, scale_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg, static_scale_ptr,
                      GROUP: tl.constexpr, STATIC: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr,
                      USE_PDL: tl.constexpr):
    """One program per (row, group of GROUP columns): scale = max |x| / 448 (or the static scale),
    x / scale saturated to e4m3's range. GROUP >= K: one group per row (per token). Rows from M on
    (padding) quantize zeros."""
    pdl_enter(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    ok = cols < K
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=(rows < M)[:, None] & ok[None, :],
                other=0.0).to(tl.float32)
    store_e4m3_rows(x, rows, cols, rows >= 0, ok, g, g + 1, xq_ptr, stride_qm, scale_ptr, stride_sm, stride_sg,
                    static_scale_ptr, GROUP, STATIC, SOFTWARE_ROUNDING, 1, GROUP)


@dataclass(frozen=True)
class Fp8ActBuffers:
    """Outputs of an activation quantization of [rows, K], allocated, and how a kernel fills them (fp8.py
    store_e4m3_rows): e4m3 values, float32 scales ([rows, 1] per token, [rows, groups] M-major (strides
    (1, rows)) per group, or the static scale itself ([1])), the columns one scale covers (the next power
    of two >= K for one per row) and the number of scale groups per row."""

    xq: torch.Tensor
    scale: torch.Tensor
    group: int
    n_groups: int

    @property
    def scale_strides(self) -> tuple[int, int]:
        """(row stride, group stride) of the scales (0, 0 for a static scale)."""
        if self.scale.dim() == 1:
            return 0, 0
        return self.scale.stride(0), self.scale.stride(1)


def check_fp8_act_input(x: torch.Tensor, rows: int | None, what: str) -> int:
    """The rows to write for activations x [M, K] (contiguous in K): `rows` (>= M), or M where None
    (`what` names the caller in errors)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{what}: x must be [M, K] contiguous in K, got {tuple(x.shape)}")
    if rows is None:
        return x.shape[0]
    if rows < x.shape[0]:
        raise ValueError(f"{what}: rows must be >= M = {x.shape[0]}, got {rows}")
    return rows


def fp8_act_buffers(rows: int, k: int, group_size: int | None, static_scale: torch.Tensor | None,
                    device: torch.device, what: str) -> Fp8ActBuffers:
    """The outputs of quantizing [rows, K] activations per token (group_size None), per group_size columns
    (a power of two) or with static_scale (one float32 value); `what` names the caller in errors."""
    xq = utils.empty_output((rows, k), torch.float8_e4m3fn, device)
    if static_scale is not None:
        if static_scale.numel() != 1 or static_scale.dtype != torch.float32:
            raise ValueError(f"{what}: static_scale must be one float32 value, got "
                             f"{static_scale.dtype} {tuple(static_scale.shape)}")
        return Fp8ActBuffers(xq, static_scale.reshape(1), triton.next_power_of_2(k), 1)
    group = triton.next_power_of_2(k) if group_size is None else group_size
    if group & (group - 1):
        raise ValueError(f"{what}: group_size must be a power of two, got {group_size}")
    groups = triton.cdiv(k, group)
    scale = (utils.empty_output((rows, 1), torch.float32, device) if groups == 1
             else utils.empty_output((groups, rows), torch.float32, device).t())
    return Fp8ActBuffers(xq, scale, group, groups)


def quantize_fp8_act(x: torch.Tensor, group_size: int | None = None, static_scale: torch.Tensor | None = None,
                     rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of torch_ref.quantize_fp8_activations: (e4m3 [M, K], float32 scales [M, 1] per token,
    [M, ceil(K / group_size)] per group, stored M-major (strides (1, M)), or static_scale itself ([1])).
    rows (>= M): the rows to return, those past x's quantizing zeros (cuBLASLt's block scaling wants the
    scales' leading dimension aligned: fp8_linear pads)."""
    rows = check_fp8_act_input(x, rows, "quantize_fp8_act")
    m, k = x.shape
    out = fp8_act_buffers(rows, k, group_size, static_scale, x.device, "quantize_fp8_act")
    if rows:
        stride_sm, stride_sg = out.scale_strides
        _quant_act_kernel[(rows, out.n_groups)](x, out.xq, out.scale, m, k, x.stride(0), out.xq.stride(0), stride_sm,
                                                stride_sg, out.scale, GROUP=out.group,
                                                STATIC=static_scale is not None,
                                                SOFTWARE_ROUNDING=utils.interpreting(),
                                                num_warps=4 if out.group <= 2048 else 8, USE_PDL=utils.pdl(),
                                                launch_pdl=utils.pdl())
    return out.xq, out.scale


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
def _fp8_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_asm, stride_ask,
                     stride_wn, stride_wsn, stride_cm, A_SCALES: tl.constexpr, BLOCK_SCALES: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, USE_PDL: tl.constexpr):
    """A_SCALES: 0 one static scale, 1 one per row, 2 one per row and BLOCK_K (= 128) columns.
    BLOCK_SCALES: W's scales per 128x128 block (else per output channel); when BLOCK_N divides 128 a
    tile's rows lie in one scale block, whose scale per K step is one value."""
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
            sa = tl.load(as_ptr + rm * stride_asm + kb * stride_ask, mask=m_ok, other=0.0)  # (M-major: contiguous)
            if 128 % BLOCK_N == 0:
                sw = tl.load(ws_ptr + ((tile_n * BLOCK_N) // 128) * stride_wsn + kb)
                acc += tl.dot(a, w) * (sa * sw)[:, None]
            else:
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
    (with block weights, any strides); weight per channel [N] or per 128x128 block."""
    m, n, k, blocks = _check_fp8_operands(xq, x_scale, weight, weight_scale)
    config = config or default_quant_gemm_config(m, n, k, out_dtype, block_scales=blocks)
    if blocks and config.block_k != FP8_BLOCK:
        raise ValueError(f"fp8_gemm: block-scaled weights need block_k = {FP8_BLOCK}, got {config.block_k}")
    if config.split_k != 1 or config.swap_ab:
        raise ValueError("fp8_gemm: split_k and swap_ab are int4_gemm's; the FP8 kernel takes split_k=1, swap_ab=False")
    out = utils.empty_output((m, n), out_dtype, xq.device)
    if m == 0:
        return out
    a_scales = 2 if blocks else (1 if x_scale.dim() == 2 else 0)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _fp8_gemm_kernel[grid](
        xq, x_scale, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, k, xq.stride(0),
        x_scale.stride(0) if x_scale.dim() == 2 else 0, x_scale.stride(1) if x_scale.dim() == 2 else 0,
        weight.stride(0), weight_scale.stride(0) if blocks else 1, out.stride(0), A_SCALES=a_scales,
        BLOCK_SCALES=blocks, HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
        USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def fp8_scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp8_gemm through torch._scaled_mm (cuBLASLt; Hopper or newer, bf16 output, K and N multiples of
    16). weight [N, K] row-major is W^T column-major, the layout _scaled_mm wants for its second operand.
    Per-channel weights: row-wise scales. Block weights (where block_scaled_mm_rows says so): 1x128
    activation scales M-major ([M, K/128], strides (1, M), as quantize_fp8_act stores them) and the
    128x128 weight scales as [K/128, N/128] whose transpose is the stored [N/128, K/128] row-major; the
    bias is added afterwards (cuBLASLt's bias epilogue is not promised with block scaling)."""
    m, n, k, blocks = _check_fp8_operands(xq, x_scale, weight, weight_scale)
    if blocks:
        scale_a = x_scale if x_scale.stride(0) == 1 or m == 1 else x_scale.t().contiguous().t()
        out = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=weight_scale.t(), out_dtype=out_dtype)
        return out if bias is None else out.add_(bias)
    scale_a = x_scale.reshape(-1, 1).expand(m, 1).contiguous() if x_scale.numel() == 1 else x_scale
    return torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=weight_scale.reshape(1, n), bias=bias,
                            out_dtype=out_dtype)


# Row multiples cuBLASLt's block-scaled FP8 accepts per CUDA device index (0: unavailable), probed once.
_BLOCK_SCALED_MM_ROWS: dict[int, int] = {}


def block_scaled_mm_rows(device: torch.device) -> int:
    """The multiple of rows that torch._scaled_mm's 1x128 x 128x128 block scaling runs on `device`
    correctly (1: any; 16: padded; 0: not at all), found once per device by running it at 37 and 48
    rows against fp8_gemm: torch before 2.9, cuBLASLt before 12.9 and GPUs before sm_90 lack it, and
    the activation scales' leading dimension may need alignment. Not probed while a CUDA graph is being
    captured (0 then: Triton runs, and the probe waits for an eager call)."""
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _BLOCK_SCALED_MM_ROWS:
        if torch.cuda.is_current_stream_capturing():
            return 0
        _BLOCK_SCALED_MM_ROWS[index] = _probe_block_scaled_mm(torch.device("cuda", index))
    return _BLOCK_SCALED_MM_ROWS[index]


def _probe_block_scaled_mm(device: torch.device) -> int:
    from carpool.quantization.formats import quantize_fp8_per_block

    if torch.cuda.get_device_capability(device) < (9, 0):
        return 0
    gen = torch.Generator().manual_seed(0)
    n, k = 256, 384
    wq, ws = (t.to(device) for t in quantize_fp8_per_block(torch.randn(n, k, generator=gen), (FP8_BLOCK, FP8_BLOCK)))
    works = {}
    for m in (37, 48):
        xq, xs = quantize_fp8_act(torch.randn(m, k, generator=gen).to(device, torch.bfloat16), FP8_BLOCK)
        try:
            got = fp8_scaled_mm(xq, xs, wq, ws, torch.bfloat16).float()
        except (RuntimeError, ValueError, NotImplementedError) as e:
            logger.info("torch._scaled_mm block scaling unavailable at %d rows (%s): block FP8 runs on Triton", m, e)
            works[m] = False
            continue
        expected = fp8_gemm(xq, xs, wq, ws, torch.float32)
        works[m] = bool(torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()))
        if not works[m]:
            logger.warning("torch._scaled_mm block scaling gave wrong results at %d rows: block FP8 runs on Triton", m)
    return 1 if works[37] and works[48] else (16 if works[48] else 0)


# Shapes where torch._scaled_mm measured faster than fp8_gemm for per-channel weights: (max M, N, K)
# triples, filled from benchmarks/bench_quant.py's "fp8_gemm_backend" section. Empty until measured:
# cuBLASLt everywhere it can run.
TRITON_FP8_GEMM_SHAPES: tuple[tuple[int, int, int], ...] = ()


def fp8_gemm_backend(m: int, n: int, k: int, block_scales: bool, out_dtype: torch.dtype,
                     block_scaled_mm: bool = False) -> str:
    """"triton" (fp8_gemm) or "scaled_mm" (torch._scaled_mm) for an [M, K] x [K, N] FP8 product: shapes
    _scaled_mm cannot run (K or N not a multiple of 16, an output other than bf16) take Triton; block
    scales take _scaled_mm where it has block scaling (block_scaled_mm, from block_scaled_mm_rows) from
    FP8_BLOCK_SCALED_MM_MIN_ROWS rows; per-channel ones take it unless a measured entry of
    TRITON_FP8_GEMM_SHAPES says Triton is faster there."""
    if k % 16 or n % 16 or out_dtype != torch.bfloat16:  # (row-wise scales: bf16 output)
        return "triton"
    if block_scales:
        return "scaled_mm" if block_scaled_mm and m >= FP8_BLOCK_SCALED_MM_MIN_ROWS else "triton"
    if any(m <= mm and n == nn and k == kk for mm, nn, kk in TRITON_FP8_GEMM_SHAPES):
        return "triton"
    return "scaled_mm"


@dataclass(frozen=True)
class Fp8ActivationPlan:
    """How fp8_linear quantizes an [M, K] input for its FP8 weight, decided from M and the weight before
    the input exists, so that the op producing the input (RMSNorm, SiLU-and-mul: ops/triton/elementwise.py)
    can write it quantized in its own pass: the GEMM backend, the columns one scale covers (None: the
    whole row, or the static scale), the static scale if any, the rows to write (>= M: cuBLASLt's
    block scaling wants them padded, with zeros) and the activations' dtype, the product's."""

    backend: str  # "triton" (fp8_gemm) or "scaled_mm"
    group_size: int | None
    static_scale: torch.Tensor | None
    rows: int
    dtype: torch.dtype


def fp8_activation_plan(m: int, weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype,
                        static_scale: torch.Tensor | None = None) -> Fp8ActivationPlan:
    """fp8_linear's plan for M rows of dtype activations (fp8_gemm_backend picks the backend)."""
    blocks = weight_scale.dim() == 2
    n, k = weight.shape
    rows_multiple = block_scaled_mm_rows(weight.device) if blocks and static_scale is None else 0
    backend = fp8_gemm_backend(m, n, k, blocks, dtype, block_scaled_mm=rows_multiple > 0)
    rows = triton.cdiv(m, rows_multiple) * rows_multiple if backend == "scaled_mm" and blocks else m
    group = FP8_BLOCK if blocks and static_scale is None else None
    return Fp8ActivationPlan(backend, group, static_scale, rows, dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, contiguous in K) times FP8 weights, the activations quantized per token
    (per 128-column group with block weights, or with the static scale) as fp8_activation_plan says,
    then fp8_linear_quantized."""
    plan = fp8_activation_plan(x.shape[0], weight, weight_scale, x.dtype, static_scale)
    xq, x_scale = quantize_fp8_act(x, plan.group_size, plan.static_scale, rows=plan.rows)
    return fp8_linear_quantized(plan, xq, x_scale, x.shape[0], weight, weight_scale, bias)


def fp8_linear_quantized(plan: Fp8ActivationPlan, xq: torch.Tensor, x_scale: torch.Tensor, m: int,
                         weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product of activations already quantized as `plan` says (xq [plan.rows, K], its scales) with the
    FP8 weights, on the plan's backend, in the plan's dtype; the first m rows."""
    if xq.shape[0] != plan.rows:
        raise ValueError(f"fp8_linear_quantized: the plan quantizes {plan.rows} rows, got {xq.shape[0]}")
    if plan.backend == "scaled_mm":
        out = fp8_scaled_mm(xq, x_scale, weight, weight_scale, plan.dtype, bias)
        return out[:m] if plan.rows != m else out
    return fp8_gemm(xq, x_scale, weight, weight_scale, plan.dtype, bias)


# --- int4 W4A16 GEMM -------------------------------------------------------------------------------------------

@triton.jit
def _int4_weight_tile(w_ptr, s_ptr, z_ptr, rn64, n_ok, k0, K, stride_wn, stride_sn, stride_zn, GROUP: tl.constexpr,
                      HAS_ZEROS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[rn, k0:k0 + BLOCK_K] of carpool's int4 layout as float32 [BLOCK_N, BLOCK_K]: (q - zero) * scale,
    zero = 8 without zeros; column 8j + i is nibble i of the tile's word j. ALIGNED: the step lies in one
    group (GROUP % BLOCK_K == 0, or one group per row), so scales and zeros are one [BLOCK_N] load; else
    they are gathered per column. Columns past K and rows past N are whatever: x's columns there are zero,
    rows past N are not stored."""
    BLOCK_W: tl.constexpr = BLOCK_K // 8
    wi = k0 // 8 + tl.arange(0, BLOCK_W)
    words = tl.load(w_ptr + rn64[:, None] * stride_wn + wi[None, :], mask=n_ok[:, None] & (wi < K // 8)[None, :],
                    other=0)
    # Each word repeated over its 8 columns (interleaving keeps the copies in one thread's registers),
    # then column c takes nibble c % 8.
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    words = tl.interleave(words, words)
    shifts = (tl.arange(0, BLOCK_K) % 8) * 4
    q = (words >> shifts[None, :]) & 0xF
    # q OR-ed into the mantissa of 2^23 is the float 2^23 + q: subtracting 2^23 leaves q exactly, in two
    # full-rate instructions instead of a quarter-rate int-to-float conversion.
    qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    if ALIGNED:
        g = k0 // GROUP
        s = tl.load(s_ptr + rn64 * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_ZEROS:
            z = tl.load(z_ptr + rn64 * stride_zn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            w = (qf - z) * s
        else:
            w = (qf - 8.0) * s
    else:
        g = tl.minimum(k0 + tl.arange(0, BLOCK_K), K - 1) // GROUP
        s = tl.load(s_ptr + rn64[:, None] * stride_sn + g[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + rn64[:, None] * stride_zn + g[None, :], mask=n_ok[:, None], other=0.0).to(tl.float32)
            w = (qf - z) * s
        else:
            w = (qf - 8.0) * s
    return w


@triton.jit
def _int4_gemm_kernel(a_ptr, w_ptr, s_ptr, z_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_sn,
                      stride_zn, stride_cm, stride_cs, steps_per_split, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (tile, split): output tile `tile` summed over K steps [split * steps_per_split, +
    steps_per_split). With one split per tile c is the output (bias added); with several, c is the
    float32 partial sums [splits, M, N] (stride_cs per split) that _split_k_reduce_kernel adds up."""
    pdl_enter(USE_PDL)
    tile_m, tile_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    rm = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    k_begin = split * steps_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + steps_per_split * BLOCK_K)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        xt_ptrs = a_ptr + rm64[None, :] * stride_am + rk[:, None]  # [BLOCK_K, BLOCK_M] view of x^T
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :]
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = (k0 + rk) < K
        w = _int4_weight_tile(w_ptr, s_ptr, z_ptr, rn64, n_ok, k0, K, stride_wn, stride_sn, stride_zn, GROUP,
                              HAS_ZEROS, ALIGNED, BLOCK_N, BLOCK_K).to(a_ptr.dtype.element_ty)
        if SWAP_AB:
            xt = tl.load(xt_ptrs + k0, mask=k_ok[:, None] & m_ok[None, :], other=0.0)
            acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
        else:
            x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + split.to(tl.int64) * stride_cs + rm64[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_k_reduce_kernel(p_ptr, b_ptr, c_ptr, M, N, splits, stride_ps, stride_cm, HAS_BIAS: tl.constexpr,
                           BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """c[m, n] = sum over splits of the float32 partials [splits, M, N] (contiguous), in split order,
    plus the bias, in c's dtype."""
    pdl_enter(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(p_ptr + s * stride_ps + offs, mask=ok, other=0.0)
    rows = offs // N
    cols = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(c_ptr + rows * stride_cm + cols, acc.to(c_ptr.dtype.element_ty), mask=ok)


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, bias: torch.Tensor | None = None,
              config: QuantGemmConfig | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) -> [M, N] in x's dtype, W dequantized tile by tile from carpool's int4
    layout into x's dtype (the twin of torch_ref.int4_linear). config.split_k > 1: float32 partial sums
    per split, added by a second kernel (as many splits as have K steps left: no empty one)."""
    n, k = check_int4(packed, scales, zeros, group_size, "int4_gemm")
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"int4_gemm: x must be [M, {k}] contiguous in K, got {tuple(x.shape)}")
    m = x.shape[0]
    config = config or default_quant_gemm_config(m, n, k, x.dtype, int4=True, group_size=group_size,
                                                 sms=num_sms(x.device))
    out = utils.empty_output((m, n), x.dtype, x.device)
    if m == 0:
        return out
    k_steps = triton.cdiv(k, config.block_k)
    steps_per_split = triton.cdiv(k_steps, config.split_k)
    splits = triton.cdiv(k_steps, steps_per_split)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else out
    _int4_gemm_kernel[(tiles, splits)](
        x, packed, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, partials,
        m, n, k, x.stride(0), packed.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0,
        n if splits > 1 else out.stride(0), m * n if splits > 1 else 0, steps_per_split, GROUP=group_size,
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None and splits == 1,
        ALIGNED=group_size % config.block_k == 0 or group_size >= k, SWAP_AB=config.swap_ab, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=config.num_warps,
        num_stages=config.num_stages, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    if splits > 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            partials, bias if bias is not None else partials, out, m, n, splits, m * n, out.stride(0),
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn, stride_on,
                         GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_ok = rn < N
    rn64 = rn.to(tl.int64)
    w = _int4_weight_tile(w_ptr, s_ptr, z_ptr, rn64, n_ok, k0, K, stride_wn, stride_sn, stride_zn, GROUP, HAS_ZEROS,
                          ALIGNED, BLOCK_N, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rn64[:, None] * stride_on + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (cols < K)[None, :])


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` from carpool's int4 layout: the twin of torch_ref.dequantize_int4 (one
    bandwidth-bound pass: 0.5 bytes read and 2 written per weight in bf16)."""
    n, k = check_int4(packed, scales, zeros, group_size, "dequantize_int4")
    out = utils.empty_output((n, k), dtype, packed.device)
    block_n, block_k = 64, int4_block_k(group_size, k)
    if n:
        _int4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            packed, scales, zeros if zeros is not None else scales, out, n, k, packed.stride(0), scales.stride(0),
            zeros.stride(0) if zeros is not None else 0, out.stride(0), GROUP=group_size, HAS_ZEROS=zeros is not None,
            ALIGNED=group_size % block_k == 0 or group_size >= k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
            USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def int4_dequant_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """int4_gemm's product for prefill-sized M: the weight dequantized once into x's dtype (a transient
    [N, K] copy: 235 MB for Llama-3-8B's gate/up in bf16), then cuBLAS (torch.nn.functional.linear)."""
    return torch.nn.functional.linear(x, dequantize_int4(packed, scales, zeros, group_size, x.dtype), bias)


def int4_gemm_backend(m: int, n: int, k: int) -> str:
    """"triton" (int4_gemm, fused) or "dequant_mm" (int4_dequant_mm) for [M, K] x [K, N]: dequant_mm from
    INT4_DEQUANT_MM_MIN_ROWS rows, where its one pass over the weight costs less than the fused kernel's
    per-tile dequantization (n and k: the shape, for a measured per-shape table like the FP8 one)."""
    return "dequant_mm" if m >= INT4_DEQUANT_MM_MIN_ROWS else "triton"


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) on the backend int4_gemm_backend picks (what Int4WeightOnlyLinearMethod runs
    above the GEMV's rows)."""
    if int4_gemm_backend(x.shape[0], packed.shape[0], packed.shape[1] * 8) == "dequant_mm":
        return int4_dequant_mm(x, packed, scales, zeros, group_size, bias)
    return int4_gemm(x, packed, scales, zeros, group_size, bias)
