"""e4m3 conversion for the Triton kernels that write FP8 (activation quantization, the FP8 KV store).

The Triton interpreter (CPU tests) converts float32 to e4m3 by rounding on one cut-off bit and without
carrying a rounded-up mantissa into the exponent (124.3 becomes 64, not 128), so in the interpreter
values are first rounded to e4m3's precision in float32 arithmetic (`round_to_e4m3`), after which the
conversion is exact. Compiled kernels convert in hardware (round to nearest even), which gives the same
values; `to_e4m3` picks between the two with a constexpr.

(Helpers take the destination pointer rather than its dtype: `ptr.dtype.element_ty` is read where it is
used, as the other kernels do.)
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite e4m3fn value; e4m3fn has no infinity (an overflow would be NaN)
E4M3_MAX = tl.constexpr(FP8_MAX)  # the same, for kernels (globals they read must be constexpr)


@triton.jit
def round_to_e4m3(x):
    """float32 x, |x| <= 448, rounded to the nearest e4m3 value (ties to even), still float32. Adding then
    subtracting c = 1.5 * 2^23 * ulp rounds x to a multiple of the ulp, because float32 additions round
    to nearest even; e4m3's ulp is 2^(exponent - 3), and 2^-9 below its normal range (2^-6)."""
    a = tl.abs(x)
    exponent = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    ulp_exponent = tl.maximum(exponent, -6) - 3
    c = ((ulp_exponent + 23 + 127) << 23).to(tl.float32, bitcast=True) * 1.5
    r = (a + c) - c
    return tl.where(x < 0, -r, r)  # the sign of x, zero included (-0.0 as the hardware gives it)


@triton.jit
def to_e4m3(x, dst_ptr, SOFTWARE_ROUNDING: tl.constexpr):
    """float32 x saturated to e4m3's range and converted to the element type of `dst_ptr` (float8e4nv)."""
    x = tl.minimum(tl.maximum(x, -E4M3_MAX), E4M3_MAX)
    if SOFTWARE_ROUNDING:
        x = round_to_e4m3(x)
    return x.to(dst_ptr.dtype.element_ty)


MIN_ACT_AMAX = tl.constexpr(1e-12)  # as ops/torch_ref/quant.py: an all-zero row still gets a finite scale


@triton.jit
def store_e4m3_rows(y, rows, cols, row_ok, col_ok, group0, n_groups, xq_ptr, stride_qm, scale_ptr, stride_sm,
                    stride_sg, static_scale_ptr, GROUP: tl.constexpr, STATIC: tl.constexpr,
                    SOFTWARE_ROUNDING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Quantize a float32 tile y [BLOCK_R, BLOCK_D] of activations to e4m3 and store it with its scales:
    rows `rows`, columns `cols` (the tile's first column starts scale group `group0`; the row has
    `n_groups` groups). Dynamic: one scale per row per GROUP columns, max |y| / 448 (never below
    MIN_ACT_AMAX / 448), stored at scale_ptr + row * stride_sm + group * stride_sg; STATIC: the one scale
    at static_scale_ptr, nothing stored. y must be zero where a row or column is out of range (it then
    cannot raise a group's maximum). The one implementation of per-token / per-group activation
    quantization: the standalone kernel (quant_gemm.quantize_fp8_act) and the ops that write their
    output quantized (RMSNorm, SiLU-and-mul) call it, so all give the same bytes."""
    if STATIC:
        q = y / tl.load(static_scale_ptr)
    else:
        NG: tl.constexpr = BLOCK_D // GROUP
        grouped = tl.reshape(y, [BLOCK_R, NG, GROUP])
        scale = tl.maximum(tl.max(tl.abs(grouped), axis=2), MIN_ACT_AMAX) / E4M3_MAX  # [BLOCK_R, NG]
        g = group0 + tl.arange(0, NG)
        tl.store(scale_ptr + rows[:, None] * stride_sm + g[None, :] * stride_sg, scale,
                 mask=row_ok[:, None] & (g < n_groups)[None, :])
        q = tl.reshape(grouped / scale[:, :, None], [BLOCK_R, BLOCK_D])
    tl.store(xq_ptr + rows[:, None] * stride_qm + cols[None, :], to_e4m3(q, xq_ptr, SOFTWARE_ROUNDING),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def e4m3_pairs_to(pairs, dtype: tl.constexpr, ASM: tl.constexpr):
    """int16 words holding two e4m3 values (the lower-addressed in the low byte) -> (low, high) in dtype.
    ASM (a GPU; dtype float16 or float32): one cvt.rn.f16x2.e4m3x2 per pair, then for float32 two
    half-to-float conversions. Triton's own cast of an e4m3 vector unpacks every byte and repacks the
    pairs first (~3 more instructions per pair), and in front of tl.dot it is moved into the
    dot-operand layout, where each byte is read from shared memory on its own. Without ASM (the
    interpreter runs no inline assembly) each byte goes through Triton's cast."""
    if ASM and dtype == tl.float16:
        low, high = tl.inline_asm_elementwise(
            asm="{ .reg .b32 h; cvt.rn.f16x2.e4m3x2 h, $2; mov.b32 {$0, $1}, h; }",
            constraints="=h,=h,h", args=[pairs], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    elif ASM:
        low, high = tl.inline_asm_elementwise(
            asm="{ .reg .b32 h; .reg .b16 l, u; cvt.rn.f16x2.e4m3x2 h, $2; mov.b32 {l, u}, h; "
                "cvt.f32.f16 $0, l; cvt.f32.f16 $1, u; }",
            constraints="=r,=r,h", args=[pairs], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        low = (pairs & 0xFF).to(tl.int8).to(tl.float8e4nv, bitcast=True).to(dtype)
        high = ((pairs >> 8) & 0xFF).to(tl.int8).to(tl.float8e4nv, bitcast=True).to(dtype)
    return low, high
