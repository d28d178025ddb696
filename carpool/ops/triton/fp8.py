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
