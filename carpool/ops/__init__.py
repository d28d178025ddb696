"""Kernel backends: one set of op signatures, two implementations (torch_ref and triton).

The model is built with a `KernelOps` and calls only these functions, so switching backend changes
kernels and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelOps:
    name: str
    paged_attention: Callable
    rms_norm: Callable
    fused_add_rms_norm: Callable
    silu_and_mul: Callable
    # RoPE (+ optional q/k norm) with the KV-cache store of the rotated k and v; paged_attention is then
    # called with k = v = None.
    rope_and_store_kv: Callable
    # One-pass sampling for batches without top-k/top-p/min-p, penalties or logprobs; None: the
    # general sampler does everything (the CPU reference path).
    sample_from_logits: Callable | None = None
    # x [1, K] @ W[N, K].T (+ bias) for batch-1 steps, faster than cuBLAS there; None: plain matmul.
    gemv: Callable | None = None
    # silu(x @ gate.T) * (x @ up.T) for batch-1 steps from a merged [gate; up] weight; None: gemv or
    # matmul, then silu_and_mul.
    gemv_silu_and_mul: Callable | None = None
    # a batch-1 step's q/k/v GEMV with rope_and_store_kv (no q/k norm) in one kernel; None: the two ops.
    gemv_rope_and_store_kv: Callable | None = None
    # x [M, K] @ W[N, K].T (+ bias) and the silu(gate) * up variant for steps of 1-16 rows
    # (ops/triton/gemv.py gemv_rows; used when KernelConfig.small_batch_gemv); None: plain matmul.
    gemv_rows: Callable | None = None
    gemv_rows_silu_and_mul: Callable | None = None
    # rms_norm (with a residual: fused_add_rms_norm) and silu_and_mul written as FP8 activations for an FP8
    # GEMM: (x, residual | None, weight, eps, group_size, static_scale, rows) -> (e4m3, scales, residual out |
    # None) and (x, group_size, static_scale, rows) -> (e4m3, scales); None: the op, then the quantization.
    rms_norm_fp8: Callable | None = None
    silu_and_mul_fp8: Callable | None = None
    # the mixture-of-experts MLP: (hidden [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k],
    # topk_ids [T, k]) -> [T, H]; the torch twin loops over the chosen experts (host-syncing, CPU only)
    fused_moe: Callable | None = None
    # fused_moe from router logits [T, E] rather than a routing: (hidden, router_logits, w13, w2,
    # TopKRouting) -> (out, topk_weights, topk_ids), the routing computed in the kernels (ties by lowest id;
    # its oracle is torch_ref.moe.fused_moe_routed). None: the model routes with torch ops, then fused_moe.
    fused_moe_routed: Callable | None = None


def get_kernel_ops(name: str) -> KernelOps:
    if name == "torch":
        from carpool.ops import torch_ref as impl
    elif name == "triton":
        from carpool.ops import triton as impl  # type: ignore[no-redef]
    else:
        raise ValueError(f"kernel backend: unknown {name!r}; choose 'torch' or 'triton'")
    return KernelOps(name=name, paged_attention=impl.paged_attention, rms_norm=impl.rms_norm,
                     fused_add_rms_norm=impl.fused_add_rms_norm, silu_and_mul=impl.silu_and_mul,
                     rope_and_store_kv=impl.rope_and_store_kv,
                     sample_from_logits=getattr(impl, "sample_from_logits", None),
                     gemv=getattr(impl, "gemv", None),
                     gemv_silu_and_mul=getattr(impl, "gemv_silu_and_mul", None),
                     gemv_rope_and_store_kv=getattr(impl, "gemv_rope_and_store_kv", None),
                     gemv_rows=getattr(impl, "gemv_rows", None),
                     gemv_rows_silu_and_mul=getattr(impl, "gemv_rows_silu_and_mul", None),
                     rms_norm_fp8=getattr(impl, "rms_norm_fp8", None),
                     silu_and_mul_fp8=getattr(impl, "silu_and_mul_fp8", None),
                     fused_moe=getattr(impl, "fused_moe", None),
                     fused_moe_routed=getattr(impl, "fused_moe_routed", None))
