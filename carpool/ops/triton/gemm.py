"""Matrix product for decode-sized batches: out[M, N] = x[M, K] @ W[N, K]^T (+ bias), 2 <= M <= 256.

Why: a decode step at batch 256 of a small model runs four projections per layer, some 6-8 us each in
cuBLAS, and the device sat idle 10-16% of the step (results/h200_run31..35 profiles), mostly around
those GEMMs: cuBLAS kernels take no part in programmatic dependent launch (utils: PDL), so every Triton
kernel before a GEMM drains completely before the GEMM launches, and the one after it launches only when
the GEMM has finished. This kernel joins the chain: it launches while the kernel before it still runs,
loads its first weight tile (nothing writes W) before it waits for x, and lets the next kernel launch
as soon as it has waited.

Tiles: each program owns a BLOCK_M x BLOCK_N output tile and walks K in BLOCK_K steps with `tl.dot`
(wgmma on Hopper for BLOCK_M >= 64). K must be a multiple of BLOCK_K (checked by `gemm_supported`), so
the K loop has no masks. The grid is (N tiles, M tiles), N fastest: programs that share x rows start
together and share them through L2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.utils import pdl_wait_then_release

# Decode batches up to this many rows take this kernel; larger (prefill) products stay on cuBLAS. The
# environment variable exists for A/B runs (0 = cuBLAS everywhere; benchmarks' --no-triton-gemm).
MAX_M_ENV = "CARPOOL_TRITON_GEMM_MAX_M"
MAX_M = int(os.environ.get(MAX_M_ENV, "64"))


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3


def default_gemm_config(m: int, n: int, k: int) -> GemmConfig:
    """A first guess until benchmarks/bench_gemm.py has swept the decode shapes on the GPU."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return GemmConfig(block_m=block_m, block_k=128 if k % 128 == 0 else 64)


def gemm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes this kernel takes (the caller sends the rest to cuBLAS)."""
    return (x.dim() == 2 and 1 < x.shape[0] <= MAX_M and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and x.shape[1] % 64 == 0 and weight.stride(-1) == 1 and x.stride(-1) == 1 and x.dtype == weight.dtype)


@triton.jit(do_not_specialize=["M"])  # the batch size changes every step: one compiled variant
def _gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    m_ok = rm < M
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
    # The first weight tile streams before waiting for the kernel that writes x (utils: PDL).
    w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
    pdl_wait_then_release(USE_PDL)
    x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
    acc = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0)
        x = tl.load(x_ptrs + k0, mask=m_ok[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N] in x's dtype, for shapes `gemm_supported` accepts."""
    if not gemm_supported(x, weight):
        raise ValueError(f"gemm: expected x [2..{MAX_M}, K] and weight [N, K] of one dtype, K a multiple of 64, "
                         f"last dims contiguous; got {tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    m, k = x.shape
    n = weight.shape[0]
    config = config or default_gemm_config(m, n, k)
    if k % config.block_k:
        raise ValueError(f"gemm: K={k} is not a multiple of block_k={config.block_k}")
    out = utils.empty_output((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m))
    _gemm_kernel[grid](x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0),
                       out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                       BLOCK_K=config.block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                       num_warps=config.num_warps, num_stages=config.num_stages, USE_PDL=utils.pdl(),
                       launch_pdl=utils.pdl())
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.linear for 2-D x: this kernel for decode-sized batches, cuBLAS for the rest."""
    if gemm_supported(x, weight):
        return gemm(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)
