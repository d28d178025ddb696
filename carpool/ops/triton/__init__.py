"""Triton GPU kernels with the op signatures of `ops/torch_ref` (which stays their test oracle).

Run on CPU through the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported) for
tests; compiled for CUDA GPUs otherwise.
"""

from carpool.ops.triton.attention import paged_attention
from carpool.ops.triton.elementwise import (
    fused_add_rms_norm,
    rms_norm,
    rms_norm_fp8,
    rope_and_store_kv,
    silu_and_mul,
    silu_and_mul_fp8,
)
from carpool.ops.triton.gemv import (
    gemv,
    gemv_rope_and_store_kv,
    gemv_rows,
    gemv_rows_silu_and_mul,
    gemv_silu_and_mul,
)
from carpool.ops.triton.moe import fused_moe, fused_moe_routed
from carpool.ops.triton.sampling import sample_from_logits

__all__ = ["paged_attention", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_and_store_kv",
           "sample_from_logits", "gemv", "gemv_silu_and_mul", "gemv_rope_and_store_kv", "gemv_rows",
           "gemv_rows_silu_and_mul", "fused_moe", "fused_moe_routed", "rms_norm_fp8", "silu_and_mul_fp8"]
