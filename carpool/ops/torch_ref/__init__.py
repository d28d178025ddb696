"""Reference kernels in plain PyTorch: the CPU path, and the oracle every Triton kernel is tested against.

Written for clarity, not speed: attention loops over requests and gathers each one's context from its
block table.
"""

from carpool.ops.torch_ref.attention import paged_attention, rope_and_store_kv
from carpool.ops.torch_ref.elementwise import fused_add_rms_norm, rms_norm, silu_and_mul
from carpool.ops.torch_ref.moe import fused_moe

__all__ = ["paged_attention", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rope_and_store_kv", "fused_moe"]
