"""Norms, SiLU-and-mul and rotary embedding (fused with the KV-cache store) as Triton kernels.

Each one is a single pass over memory (these ops are bandwidth-bound), computes in float32 and rounds
where the torch reference rounds, so float32 results match `ops/torch_ref/elementwise.py` to rounding
and bf16 results differ from it by at most one bf16 ulp per rounding step.

Rows: inputs are `[N, D]` or `[N, H, D]` with a contiguous last dim but any row strides (q and k arrive
as views of the fused qkv projection), so a row index r is split into (r // H, r % H) and each part
gets its own stride instead of forcing a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.fp8 import store_e4m3_rows
from carpool.ops.triton.paged_kv import check_kv_scales, is_fp8_cache, kv_cache_value, slot_row
from carpool.ops.triton.quant_gemm import Fp8ActBuffers, check_fp8_act_input, fp8_act_buffers
from carpool.ops.triton.utils import pdl_enter


def _rows_view(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(num_rows, inner, stride_outer, stride_inner) of a 2D or 3D tensor with a unit last stride."""
    if x.stride(-1) != 1:
        raise ValueError(f"input: last dim must be contiguous, got strides {tuple(x.stride())}")
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), 0
    if x.dim() == 3:
        return x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)
    raise ValueError(f"input: expected 2 or 3 dims, got shape {tuple(x.shape)}")


def _rows_per_program(block_d: int) -> int:
    # Short rows (per-head q/k norm, D = 128) would leave each program nearly idle: pack several.
    return max(1, min(16, 2048 // block_d))


@triton.jit(do_not_specialize=["n_rows", "n_out_rows"])  # row counts change every step: one compiled variant
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, n_inner,
                     sx_outer, sx_inner, sr_outer, sr_inner, eps,
                     scale_ptr, stride_sm, stride_sg, static_scale_ptr, n_out_rows, n_groups,
                     D: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr, FP8_OUT: tl.constexpr, GROUP: tl.constexpr, STATIC: tl.constexpr,
                     SOFTWARE_ROUNDING: tl.constexpr, USE_PDL: tl.constexpr):
    """out = weight * rms_norm(x [+ residual]); with a residual also res_out = x + residual.

    Outputs are contiguous [n_rows, D]. FP8_OUT: out is e4m3 [n_out_rows, D] (rows from n_rows on are
    zeros), the normalized rows rounded to x's dtype and quantized as quant_gemm.quantize_fp8_act
    quantizes them (fp8.store_e4m3_rows, scales at scale_ptr)."""
    pdl_enter(USE_PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < D)
    rows64 = rows.to(tl.int64)
    x_off = (rows64 // n_inner) * sx_outer + (rows64 % n_inner) * sx_inner
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0)
    out_off = rows64[:, None] * D + cols[None, :]
    if HAS_RESIDUAL:
        r_off = (rows64 // n_inner) * sr_outer + (rows64 % n_inner) * sr_inner
        r = tl.load(res_ptr + r_off[:, None] + cols[None, :], mask=mask, other=0.0)
        # The reference adds in the input dtype, so round the sum before normalizing it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + out_off, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
    # Reference: weight * (x * rstd).to(x.dtype) -- round to the input dtype, then scale.
    y = (xf * rstd[:, None]).to(x.dtype).to(tl.float32) * w.to(tl.float32)[None, :]
    if FP8_OUT:
        # (the unfused path stores y in x's dtype and quantizes what it stored: round the same way)
        store_e4m3_rows(y.to(x.dtype).to(tl.float32), rows64, cols, rows < n_out_rows, cols < D, 0, n_groups,
                        out_ptr, D, scale_ptr, stride_sm, stride_sg, static_scale_ptr, GROUP, STATIC,
                        SOFTWARE_ROUNDING, BLOCK_R, BLOCK_D)
    else:
        tl.store(out_ptr + out_off, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
          fp8_out: Fp8ActBuffers | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight: expected shape ({d},), got {tuple(weight.shape)}")
    n_rows, n_inner, sx_o, sx_i = _rows_view(x)
    out = (fp8_out.xq if fp8_out is not None
           else utils.empty_output(x.shape, dtype=torch.result_type(weight, x), device=x.device))
    res_out = None
    sr_o = sr_i = 0
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual: expected {tuple(x.shape)} {x.dtype}, got "
                             f"{tuple(residual.shape)} {residual.dtype}")
        _, _, sr_o, sr_i = _rows_view(residual)
        res_out = utils.empty_output(x.shape, dtype=x.dtype, device=x.device)
    n_out_rows = n_rows if fp8_out is None else fp8_out.xq.shape[0]
    if n_out_rows == 0:
        return out, res_out
    block_d = triton.next_power_of_2(d) if fp8_out is None else max(triton.next_power_of_2(d), fp8_out.group)
    block_r = _rows_per_program(block_d)
    grid = (triton.cdiv(n_out_rows, block_r),)
    scale = fp8_out.scale if fp8_out is not None else weight
    stride_sm, stride_sg = fp8_out.scale_strides if fp8_out is not None else (0, 0)
    _rms_norm_kernel[grid](x, residual if residual is not None else x, weight, out,
                           res_out if res_out is not None else out, n_rows, n_inner, sx_o, sx_i,
                           sr_o, sr_i, eps, scale, stride_sm, stride_sg, scale, n_out_rows,
                           fp8_out.n_groups if fp8_out is not None else 1, D=d, HAS_RESIDUAL=residual is not None,
                           BLOCK_R=block_r, BLOCK_D=block_d, FP8_OUT=fp8_out is not None,
                           GROUP=fp8_out.group if fp8_out is not None else block_d,
                           STATIC=fp8_out is not None and fp8_out.scale.dim() == 1,
                           SOFTWARE_ROUNDING=utils.interpreting(), num_warps=4 if block_d <= 2048 else 8,
                           USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(x) over the last dim; x is [N, D] or [N, H, D] (rows may be strided)."""
    return _norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the inputs are left untouched."""
    out, res_out = _norm(x, residual, weight, eps)
    assert res_out is not None
    return out, res_out


def rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 group_size: int | None, static_scale: torch.Tensor | None, rows: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """rms_norm(x [+ residual]) written as FP8 activations in the same pass: (e4m3 [rows, D], scales,
    x + residual or None), the bytes and scales quant_gemm.quantize_fp8_act(rms_norm(...), group_size,
    static_scale, rows) gives, without the model-dtype output and the second pass over it. x [N, D]
    contiguous in D, weight in x's dtype (the unfused norm's output dtype), rows >= N."""
    check_fp8_act_input(x, rows, "rms_norm_fp8")
    if weight.dtype != x.dtype:
        raise ValueError(f"rms_norm_fp8: weight must be in x's dtype {x.dtype}, got {weight.dtype}")
    buffers = fp8_act_buffers(rows, x.shape[1], group_size, static_scale, x.device, "rms_norm_fp8")
    _, res_out = _norm(x, residual, weight, eps, buffers)
    return buffers.xq, buffers.scale, res_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, n_rows, scale_ptr, stride_sm, stride_sg, static_scale_ptr,
                         n_groups, BLOCK: tl.constexpr, FP8_OUT: tl.constexpr, GROUP: tl.constexpr,
                         STATIC: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr, USE_PDL: tl.constexpr):
    """One program per (row, BLOCK columns) of out = silu(gate) * up. FP8_OUT: out is e4m3, quantized
    as quant_gemm.quantize_fp8_act quantizes the model-dtype result (fp8.store_e4m3_rows: BLOCK covers
    whole scale groups, or the whole row for one scale per row); rows from n_rows on are zeros."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < tl.where(row < n_rows, d, 0)  # (rows from n_rows on: padding, all zeros)
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # The reference rounds silu(gate) to the input dtype before the multiply; so do we.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    if FP8_OUT:
        rows = row + tl.arange(0, 1)
        store_e4m3_rows(y.to(tl.float32)[None, :], rows, cols, rows >= 0, cols < d, tl.program_id(1) * (BLOCK // GROUP),
                        n_groups, out_ptr, d, scale_ptr, stride_sm, stride_sg, static_scale_ptr, GROUP, STATIC,
                        SOFTWARE_ROUNDING, 1, BLOCK)
    else:
        tl.store(out_ptr + row * d + cols, y, mask=mask)


def _silu_and_mul(x: torch.Tensor, fp8_out: Fp8ActBuffers | None) -> torch.Tensor:
    two_d = x.shape[-1]
    if two_d % 2:
        raise ValueError(f"x: last dim must be even ([gate | up]), got {two_d}")
    d = two_d // 2
    x2 = x.reshape(-1, two_d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if fp8_out is None:
        out = utils.empty_output((x2.shape[0], d), dtype=x.dtype, device=x.device)
        block = min(1024, triton.next_power_of_2(d)) if d else 1
        out_rows, group, n_groups, static, scale = x2.shape[0], block, 1, False, out
    else:
        out, scale = fp8_out.xq, fp8_out.scale
        static = scale.dim() == 1
        # a program's columns hold whole scale groups (the whole row for one scale per row)
        if static:
            block = min(1024, triton.next_power_of_2(d))
        else:
            block = fp8_out.group if fp8_out.n_groups == 1 else max(1024, fp8_out.group)
        out_rows, group, n_groups = out.shape[0], fp8_out.group, fp8_out.n_groups
    stride_sm, stride_sg = fp8_out.scale_strides if fp8_out is not None else (0, 0)
    if out_rows and d:
        _silu_and_mul_kernel[(out_rows, triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), x2.shape[0], scale, stride_sm, stride_sg, scale, n_groups, BLOCK=block,
            FP8_OUT=fp8_out is not None, GROUP=group, STATIC=static, SOFTWARE_ROUNDING=utils.interpreting(),
            num_warps=4 if block <= 2048 else min(16, block // 1024), USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up, shape [..., d]."""
    d = x.shape[-1] // 2
    return _silu_and_mul(x, None).view(*x.shape[:-1], d)


def silu_and_mul_fp8(x: torch.Tensor, group_size: int | None, static_scale: torch.Tensor | None, rows: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up of x [N, 2d] written as FP8 activations in the same pass: (e4m3 [rows, d], scales),
    the bytes and scales quant_gemm.quantize_fp8_act(silu_and_mul(x), group_size, static_scale, rows)
    gives, without the model-dtype output and the second pass over it (rows >= N; rows past N zeros)."""
    check_fp8_act_input(x, rows, "silu_and_mul_fp8")
    buffers = fp8_act_buffers(rows, x.shape[1] // 2, group_size, static_scale, x.device, "silu_and_mul_fp8")
    _silu_and_mul(x, buffers)
    return buffers.xq, buffers.scale


@triton.jit
def _rope_heads(ptr, base, stride_h, n_heads, cos, sin, w_ptr, eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rotate-half RoPE of one token's heads: [x1, x2] -> [x1 c - x2 s, x2 c + x1 s], computed in float32
    and returned in the input dtype (masked lanes hold 0). With HAS_NORM each head is first RMS-normalized
    with weight w (Qwen3's q/k norm), rounded as the reference rounds: normalize in fp32, cast to the input
    dtype, multiply by the weight, cast again."""
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    p1 = ptr + base + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    if HAS_NORM:
        inv = tl.rsqrt((tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * HALF) + eps)
        w1 = tl.load(w_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        x1f = ((x1f * inv[:, None]).to(x1.dtype).to(tl.float32) * w1[None, :]).to(x1.dtype).to(tl.float32)
        x2f = ((x2f * inv[:, None]).to(x1.dtype).to(tl.float32) * w2[None, :]).to(x1.dtype).to(tl.float32)
    y1 = (x1f * cos[None, :] - x2f * sin[None, :]).to(x1.dtype)
    y2 = (x2f * cos[None, :] + x1f * sin[None, :]).to(x1.dtype)
    return y1, y2


@triton.jit
def _rotate_heads(ptr, base, stride_h, n_heads, cos, sin, w_ptr, eps, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr):
    """_rope_heads, written back in place."""
    y1, y2 = _rope_heads(ptr, base, stride_h, n_heads, cos, sin, w_ptr, eps, HALF, BLOCK_H, BLOCK_HALF, HAS_NORM)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    p1 = ptr + base + heads[:, None] * stride_h + cols[None, :]
    tl.store(p1, y1, mask=mask)
    tl.store(p1 + HALF, y2, mask=mask)


@triton.jit
def _cos_sin(pos_ptr, t, cos_sin_ptr, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token t's cos and sin rows (first and second half of its cos_sin_cache row)."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + cols, mask=cmask, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + cols, mask=cmask, other=0.0)
    return cos, sin


@triton.jit
def _rope_store_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, qw_ptr, kw_ptr, eps, slot_ptr,
                          k_cache_ptr, v_cache_ptr, n_q_heads, n_k_heads, stride_qt, stride_qh, stride_kt,
                          stride_kh, stride_vt, stride_vh, stride_cs, stride_kcb, stride_kcs, stride_kch,
                          stride_vcb, stride_vcs, stride_vch, k_scale, v_scale, HALF: tl.constexpr,
                          PAGE_SIZE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                          BLOCK_HALF: tl.constexpr, HAS_NORM: tl.constexpr, KV_FP8: tl.constexpr,
                          SOFTWARE_ROUNDING: tl.constexpr, USE_PDL: tl.constexpr):
    """One program per token: RoPE (after the optional q/k norm) on q in place, and the rotated k with v
    written straight to the token's cache slot, so k never makes a round trip through memory (an FP8
    cache: k / k_scale and v / v_scale in e4m3, paged_kv.kv_cache_value)."""
    pdl_enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, t, cos_sin_ptr, stride_cs, HALF, BLOCK_HALF)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < HALF
    _rotate_heads(q_ptr, t * stride_qt, stride_qh, n_q_heads, cos, sin, qw_ptr, eps, HALF, BLOCK_HQ, BLOCK_HALF,
                  HAS_NORM)
    y1, y2 = _rope_heads(k_ptr, t * stride_kt, stride_kh, n_k_heads, cos, sin, kw_ptr, eps, HALF, BLOCK_HK,
                         BLOCK_HALF, HAS_NORM)
    page, row, n_store = slot_row(slot_ptr, t, n_k_heads, PAGE_SIZE)
    heads = tl.arange(0, BLOCK_HK)
    mask = (heads[:, None] < n_store) & cmask[None, :]
    kc = k_cache_ptr + page * stride_kcb + row * stride_kcs + heads[:, None] * stride_kch + cols[None, :]
    tl.store(kc, kv_cache_value(y1, k_scale, k_cache_ptr, KV_FP8, SOFTWARE_ROUNDING), mask=mask)
    tl.store(kc + HALF, kv_cache_value(y2, k_scale, k_cache_ptr, KV_FP8, SOFTWARE_ROUNDING), mask=mask)
    vp = v_ptr + t * stride_vt + heads[:, None] * stride_vh + cols[None, :]
    vc = v_cache_ptr + page * stride_vcb + row * stride_vcs + heads[:, None] * stride_vch + cols[None, :]
    tl.store(vc, kv_cache_value(tl.load(vp, mask=mask, other=0.0), v_scale, v_cache_ptr, KV_FP8,
                                SOFTWARE_ROUNDING), mask=mask)
    tl.store(vc + HALF, kv_cache_value(tl.load(vp + HALF, mask=mask, other=0.0), v_scale, v_cache_ptr, KV_FP8,
                                       SOFTWARE_ROUNDING), mask=mask)


def _check_rotary(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q, k: expected [T, H, D] with equal T and D, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    head_dim = q.shape[-1]
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(f"cos_sin_cache: expected [max_pos, {head_dim}] with even head_dim, "
                         f"got {tuple(cos_sin_cache.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k, cos_sin_cache: last dim must be contiguous")


def rope_and_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, q_weight: torch.Tensor | None = None,
                      k_weight: torch.Tensor | None = None, eps: float = 0.0, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> torch.Tensor:
    """RoPE (after Qwen3's per-head q/k RMSNorm when weights are given) on q IN PLACE, and the rotated k
    with v stored at their cache slots (slots < 0 are padding, skipped; an FP8 cache: k / k_scale and
    v / v_scale in e4m3); k itself is left as it was. Returns q. One kernel instead of rotary + store:
    the attention that follows reads k from the cache."""
    _check_rotary(q, k, cos_sin_cache)
    if v.shape != k.shape or v.stride(-1) != 1:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)} with a contiguous last dim, "
                         f"got {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache, v_cache: expected [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}], "
                         f"got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache, v_cache: last dim must be contiguous")
    check_kv_scales(k_cache, k_scale, v_scale)
    n_tokens = q.shape[0]
    if n_tokens:
        half = q.shape[-1] // 2
        qw = q_weight if q_weight is not None else cos_sin_cache
        kw = k_weight if k_weight is not None else cos_sin_cache
        _rope_store_kv_kernel[(n_tokens,)](
            positions, q, k, v, cos_sin_cache, qw, kw, eps, slot_mapping, k_cache, v_cache, q.shape[1],
            k.shape[1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), float(k_scale), float(v_scale), HALF=half,
            PAGE_SIZE=k_cache.shape[1], BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(half),
            HAS_NORM=q_weight is not None, KV_FP8=is_fp8_cache(k_cache), SOFTWARE_ROUNDING=utils.interpreting(),
            num_warps=4, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return q
