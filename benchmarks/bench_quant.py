"""Quantized projections of the Llama-3-8B shape: FP8 W8A8 (per-channel and 128x128-block scales) and INT4
(AWQ-style: group 128, zero points) against bf16, each as a ratio to its roofline measured in the same run,
through the engine's own dispatch (the LinearMethods of carpool/quantization/methods.py). Prints one JSON
object (progress on stderr).

    python benchmarks/bench_quant.py [--out FILE] [--quick] [--sweep] [--gemm] [--gate-up-silu] [--batch-one]
                                     [--dry-run]

- decode: one layer's four projections (q/k/v, o, gate/up, down) at batch 1, 4, 8 (the GEMVs) and 64
  (activation quantization + GEMM for FP8, the int4 GEMM): microseconds per layer set, bytes read
  (weights, scales, zeros, activations) over time as a fraction of the measured copy bandwidth, and
  time against bf16 (the issue's targets, whole model: FP8 <= 0.58x and INT4 <= 0.35x of bf16 at batch 1).
- prefill: the same layer set on 8192 tokens (one max_num_batched_tokens step): tokens/s, against bf16,
  and FLOP/s as a fraction of a large matmul's measured here (bf16 for bf16 and INT4, which multiplies
  in bf16; FP8 torch._scaled_mm for FP8).
- fp8_gemm_backend: per projection and M, torch._scaled_mm against the Triton FP8 GEMM on per-channel
  weights; `triton_faster` lists the (M, N, K) where Triton won, for quant_gemm.TRITON_FP8_GEMM_SHAPES.
- gate_up_silu: the gate/up projection (28672 x 4096) with SiLU-and-mul at batch 1, 4, 8, per method: the
  fused GEMV (one kernel: gemv.gemv_silu_and_mul for bf16, batch 1 only as the engine uses it;
  quant_gemv.fp8_gemv_silu_and_mul / int4_gemv_silu_and_mul) side by side with the GEMV then silu_and_mul
  (two kernels), through the LinearMethods, each as a fraction of copy bandwidth (the fused path's bytes:
  weights, x and the [M, d] output) and fused / two-kernel time. `--gate-up-silu`: only this section.
- backends: per projection and M, INT4 fused Triton against dequantize-then-cuBLAS and block-scaled FP8
  Triton against torch._scaled_mm's block scaling (where the GPU and torch have it), with what the
  dispatch picks: the evidence for quant_gemm.INT4_DEQUANT_MM_MIN_ROWS and FP8_BLOCK_SCALED_MM_MIN_ROWS.
- --sweep: quant_gemv.QuantGemvConfig (block_n x block_k x num_warps, sweep_configs) per method (FP8 channel,
  FP8 block, INT4), projection and batch 1, 4, 8, as fractions of copy bandwidth, with the best and the
  default side by side; with --gate-up-silu only the fused gate/up GEMV. Also GEMM configs
  (quant_gemm.QuantGemmConfig: tiles, warps, stages, split_k, swap_ab) for INT4 at M 16/64/256 and block
  FP8 at 64/512/8192. --gemm: only the GEMM sections (batch-64 decode, prefill, backends; the GEMM sweep
  with --sweep).
- --batch-one: batch 1 only (the decode section; with --sweep the GEMV sweep, where batch 1 adds the
  one-row kernels' configs beside the 1-8-row kernel's).
- --dry-run: the cases with their bytes and FLOPs, without a GPU.
- --quality: each method's logit error on a random-weight Llama against float32 (CPU or GPU; the issue's
  quality figure until a trained demo model exists): bf16, FP8 weights, FP8 W8A8, FP8 blocks, INT4
  group 128, an FP8 KV cache, FP8 W8A8 + FP8 KV. On a trained checkpoint, held-out perplexity through the
  engine: benchmarks/quant_quality.py.

Weights are random, in each format's layout, cycled through enough copies (>= 512 MiB per graph) that no
call finds its weights in L2, as a decode step would not. Timed inside CUDA graphs (bench_kernels).
"""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

from carpool.quantization.config import FP8_BLOCK, Fp8Scheme, Int4Scheme  # noqa: E402
from carpool.utils import cdiv  # noqa: E402

# (name, N, K) of one Llama-3-8B decoder layer
PROJECTIONS = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]
METHODS = ("bf16", "fp8", "fp8_block", "int4")
DECODE_BATCHES = (1, 4, 8, 64)
GATE_UP = PROJECTIONS[2]
GATE_UP_BATCHES = (1, 4, 8)  # the GEMV rows (quant_gemv.MAX_GEMV_ROWS = 8)
PREFILL_TOKENS = 8192
SELECTOR_M = (16, 32, 64, 128, 256, 512, 1024, 2048, 8192)
BACKEND_M = (16, 64, 256, 512, 1024, 2048, 4096, 8192)
BACKEND_M_QUICK = (64, 512, 1024, 8192)
GROUP = 128


def weight_bytes(method: str, n: int, k: int) -> int:
    """Bytes a projection's weights occupy (and a GEMV reads) in the method's layout."""
    if method == "bf16":
        return 2 * n * k
    if method == "fp8":
        return n * k + 4 * n  # e4m3 + a float32 scale per output channel
    if method == "fp8_block":
        return n * k + 4 * cdiv(n, FP8_BLOCK[0]) * cdiv(k, FP8_BLOCK[1])
    if method == "int4":
        return n * k // 2 + 2 * 2 * n * (k // GROUP)  # nibbles + bf16 scales and zeros per group
    raise ValueError(method)


def layer_bytes(method: str, m: int) -> int:
    """A layer set's bytes at m rows: weights once, bf16 activations in and out."""
    return sum(weight_bytes(method, n, k) + 2 * m * (n + k) for _, n, k in PROJECTIONS)


def gate_up_silu_bytes(method: str, m: int) -> int:
    """The fused gate/up + SiLU-and-mul's bytes at m rows: weights once, bf16 x in and [m, d] out."""
    _, n, k = GATE_UP
    return weight_bytes(method, n, k) + 2 * m * (k + n // 2)


def layer_flops(m: int) -> int:
    return sum(2 * m * n * k for _, n, k in PROJECTIONS)


def dry_run() -> dict[str, Any]:
    return {"benchmark": "quant/llama3-8b-layer", "dry_run": True, "projections": PROJECTIONS,
            "decode": [{"method": meth, "batch": m, "bytes": layer_bytes(meth, m)}
                       for meth in METHODS for m in DECODE_BATCHES],
            "prefill": {"tokens": PREFILL_TOKENS, "flops": layer_flops(PREFILL_TOKENS)},
            "gate_up_silu": [{"method": meth, "batch": m, "bytes": gate_up_silu_bytes(meth, m)}
                             for meth in METHODS for m in GATE_UP_BATCHES]}


# --- weights and the engine's dispatch ----------------------------------------------------------------------

def make_layer(method: str, n: int, k: int, gen: torch.Generator, dev: str = "cuda",
               fused_gemv_silu: bool = False) -> tuple[Any, Any]:
    """(layer, LinearMethod) holding random weights of one projection in the method's layout; with
    fused_gemv_silu the method's apply_silu_and_mul takes the GEMV rows (KernelConfig.fused_gemv_silu)."""
    from carpool.layers.linear_method import UnquantizedLinearMethod
    from carpool.ops import triton as tri
    from carpool.quantization.methods import Fp8LinearMethod, Int4WeightOnlyLinearMethod

    if method == "bf16":
        w = (torch.randn(n, k, generator=gen, device=dev) / k ** 0.5).to(torch.bfloat16)
        return SimpleNamespace(weight=w, input_size=k), UnquantizedLinearMethod(
            gemv=tri.gemv, gemv_silu_and_mul=tri.gemv_silu_and_mul if fused_gemv_silu else None)
    if method in ("fp8", "fp8_block"):
        w = torch.randn(n, k, generator=gen, device=dev).to(torch.float8_e4m3fn)
        if method == "fp8":
            scheme = Fp8Scheme("compressed-tensors", "channel", None, dynamic_activations=True)
            scale = torch.rand(n, generator=gen, device=dev) / (k ** 0.5 * 4)
        else:
            scheme = Fp8Scheme("fp8", "block", FP8_BLOCK, dynamic_activations=True)
            scale = torch.rand(cdiv(n, FP8_BLOCK[0]), cdiv(k, FP8_BLOCK[1]), generator=gen, device=dev) / (k ** 0.5 * 4)
        fp8 = Fp8LinearMethod(scheme, "triton", fused_gemv_silu)
        return SimpleNamespace(weight=w, input_size=k, **{fp8.scale_name: scale}), fp8
    packed = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), generator=gen, device=dev, dtype=torch.int32)
    scales = (torch.rand(n, k // GROUP, generator=gen, device=dev) / (k ** 0.5 * 8)).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // GROUP), generator=gen, device=dev).to(torch.bfloat16)
    int4 = Int4WeightOnlyLinearMethod(Int4Scheme("awq", GROUP, symmetric=False), "triton", fused_gemv_silu)
    return SimpleNamespace(qweight=packed, scales=scales, qzeros=zeros, input_size=k), int4


def layer_sets(method: str, m: int, gen: torch.Generator) -> list:
    """Enough copies of the layer's weights that a graph cycling through them touches >= 512 MiB."""
    from bench_kernels import num_sets

    sets = num_sets(layer_bytes(method, m))
    return [[make_layer(method, n, k, gen) for _, n, k in PROJECTIONS] for _ in range(sets)]


def time_layer(method: str, m: int, gen: torch.Generator) -> float:
    """Seconds per layer set at m rows (one call = the four projections, each on its own input)."""
    from bench_kernels import time_in_graph

    sets = layer_sets(method, m, gen)
    xs = [torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16) for _, _, k in PROJECTIONS]

    def call(layers: list) -> None:
        for (layer, meth), x in zip(layers, xs):
            meth.apply(layer, x, None)
    sec = time_in_graph([(lambda s=s: call(s)) for s in sets])
    del sets
    torch.cuda.empty_cache()
    return sec


def measure_fp8_flops(n: int = 8192) -> float:
    """FP8 (e4m3) matmul n^3 through torch._scaled_mm, FLOP/s (median of 10 after warm-up)."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones(1, device="cuda")
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n ** 3 / times[len(times) // 2]


# --- sections -----------------------------------------------------------------------------------------------

def decode_section(bandwidth: float, batches: tuple[int, ...], gen: torch.Generator) -> list[dict]:
    rows = []
    for m in batches:
        bf16_s = None
        for method in METHODS:
            sec = time_layer(method, m, gen)
            bf16_s = sec if method == "bf16" else bf16_s
            nbytes = layer_bytes(method, m)
            row = {"batch": m, "method": method, "us_per_layer_set": round(sec * 1e6, 2), "bytes": nbytes,
                   "copy_roofline_ratio": round(nbytes / sec / bandwidth, 3),
                   "time_vs_bf16": round(sec / bf16_s, 3) if bf16_s else None}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def prefill_section(bf16_flops: float, fp8_flops: float, gen: torch.Generator) -> list[dict]:
    rows = []
    bf16_s = None
    flops = layer_flops(PREFILL_TOKENS)
    for method in METHODS:
        sec = time_layer(method, PREFILL_TOKENS, gen)
        bf16_s = sec if method == "bf16" else bf16_s
        peak = fp8_flops if method.startswith("fp8") else bf16_flops
        row = {"method": method, "tokens": PREFILL_TOKENS, "tokens_per_s_per_layer_set": round(PREFILL_TOKENS / sec),
               "flops_roofline_ratio": round(flops / sec / peak, 3), "roofline": "fp8" if peak is fp8_flops else "bf16",
               "tokens_per_s_vs_bf16": round(bf16_s / sec, 3) if bf16_s else None}
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def selector_section(gen: torch.Generator, ms: tuple[int, ...]) -> dict[str, Any]:
    """torch._scaled_mm against the Triton FP8 GEMM for per-channel weights, per projection and M."""
    from bench_kernels import time_in_graph

    from carpool.ops.triton.quant_gemm import fp8_gemm, fp8_scaled_mm, quantize_fp8_act

    rows, triton_faster = [], []
    for name, n, k in PROJECTIONS:
        w = torch.randn(n, k, generator=gen, device="cuda").to(torch.float8_e4m3fn)
        s = torch.rand(n, generator=gen, device="cuda")
        for m in ms:
            xq, xs = quantize_fp8_act(torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16))
            t_mm = time_in_graph([lambda: fp8_scaled_mm(xq, xs, w, s, torch.bfloat16)])
            t_tr = time_in_graph([lambda: fp8_gemm(xq, xs, w, s, torch.bfloat16)])
            row = {"proj": name, "m": m, "n": n, "k": k, "scaled_mm_us": round(t_mm * 1e6, 2),
                   "triton_us": round(t_tr * 1e6, 2), "winner": "triton" if t_tr < t_mm else "scaled_mm"}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
            if t_tr < t_mm:
                triton_faster.append((m, n, k))
    return {"cases": rows, "triton_faster": triton_faster}


def _int4_weights(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), generator=gen, device="cuda", dtype=torch.int32)
    scales = (torch.rand(n, k // GROUP, generator=gen, device="cuda") / (k ** 0.5 * 8)).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // GROUP), generator=gen, device="cuda").to(torch.bfloat16)
    return packed, scales, zeros


def _fp8_block_weights(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=gen, device="cuda").to(torch.float8_e4m3fn)
    return w, torch.rand(cdiv(n, FP8_BLOCK[0]), cdiv(k, FP8_BLOCK[1]), generator=gen, device="cuda") / k ** 0.5


def backends_section(gen: torch.Generator, ms: tuple[int, ...]) -> dict[str, Any]:
    """Per projection and M, each GEMM backend the dispatch chooses between, at its default config, weights
    cycled out of L2: INT4 fused Triton (int4_gemm) against dequantize-then-cuBLAS (int4_dequant_mm), for
    quant_gemm.INT4_DEQUANT_MM_MIN_ROWS; block-scaled FP8 Triton (fp8_gemm, activation quantization
    included) against torch._scaled_mm's block scaling where quant_gemm.block_scaled_mm_rows finds it, for
    FP8_BLOCK_SCALED_MM_MIN_ROWS. `chosen` is what the dispatch picks now."""
    from bench_kernels import num_sets, time_in_graph

    from carpool.ops.triton import quant_gemm as qg

    rows = []
    scaled_mm_rows = qg.block_scaled_mm_rows(torch.device("cuda"))
    for name, n, k in PROJECTIONS:
        int4 = [_int4_weights(n, k, gen) for _ in range(num_sets(weight_bytes("int4", n, k)))]
        fp8 = [_fp8_block_weights(n, k, gen) for _ in range(num_sets(weight_bytes("fp8_block", n, k)))]
        for m in ms:
            x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
            fused = time_in_graph([lambda w=w: qg.int4_gemm(x, *w, GROUP) for w in int4])
            dequant = time_in_graph([lambda w=w: qg.int4_dequant_mm(x, *w, GROUP) for w in int4])

            def fp8_triton(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return qg.fp8_gemm(*qg.quantize_fp8_act(x, FP8_BLOCK[1]), w, s, torch.bfloat16)

            def fp8_cublas(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                rows_ = cdiv(m, scaled_mm_rows) * scaled_mm_rows
                return qg.fp8_scaled_mm(*qg.quantize_fp8_act(x, FP8_BLOCK[1], rows=rows_), w, s, torch.bfloat16)[:m]
            t_tr = time_in_graph([lambda w=w: fp8_triton(*w) for w in fp8])
            t_mm = time_in_graph([lambda w=w: fp8_cublas(*w) for w in fp8]) if scaled_mm_rows else None
            row = {"proj": name, "m": m, "n": n, "k": k, "int4_triton_us": round(fused * 1e6, 2),
                   "int4_dequant_mm_us": round(dequant * 1e6, 2),
                   "int4_chosen": qg.int4_gemm_backend(m, n, k),
                   "fp8_block_triton_us": round(t_tr * 1e6, 2),
                   "fp8_block_scaled_mm_us": round(t_mm * 1e6, 2) if t_mm else None,
                   "fp8_block_chosen": qg.fp8_gemm_backend(m, n, k, True, torch.bfloat16, scaled_mm_rows > 0)}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
        del int4, fp8
        torch.cuda.empty_cache()
    return {"block_scaled_mm_rows": scaled_mm_rows, "cases": rows}


def triton_next_pow2(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def gemm_sweep_section(gen: torch.Generator) -> list[dict]:
    """Launch configs of the INT4 GEMM (tiles, warps, stages, split_k, swap_ab) at M 16, 64, 256 and of the
    block-scaled FP8 Triton GEMM at M 64, 512, 8192, per projection, against the default
    (quant_gemm.default_quant_gemm_config)."""
    from bench_kernels import num_sets, time_in_graph

    from carpool.ops.triton import quant_gemm as qg

    QC = qg.QuantGemmConfig
    rows = []
    for name, n, k in PROJECTIONS:
        int4 = [_int4_weights(n, k, gen) for _ in range(num_sets(weight_bytes("int4", n, k)))]
        for m in (16, 64, 256):
            x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
            default = qg.default_quant_gemm_config(m, n, k, torch.bfloat16, int4=True, group_size=GROUP,
                                                   sms=qg.num_sms(x.device))
            bm = max(16, min(128, triton_next_pow2(m)))
            st = 4 if m <= 64 else 3
            configs = [QC(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st, split_k=sk, swap_ab=sw)
                       for bn, bk, w in ((128, 64, 8), (128, 64, 4), (128, 128, 8), (64, 128, 4), (64, 64, 4))
                       for sk in sorted({1, default.split_k}) for sw in (False, True)]
            results = []
            for cfg in dict.fromkeys([default] + configs):
                sec = time_in_graph([lambda w=w, cfg=cfg: qg.int4_gemm(x, *w, GROUP, config=cfg) for w in int4])
                results.append({**cfg.__dict__, "us": round(sec * 1e6, 2), "default": cfg == default})
            rows.append(_sweep_row("int4", name, m, results))
        del int4
        fp8 = [_fp8_block_weights(n, k, gen) for _ in range(num_sets(weight_bytes("fp8_block", n, k)))]
        for m in (64, 512, 8192):
            xq, xs = qg.quantize_fp8_act(torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16), 128)
            default = qg.default_quant_gemm_config(m, n, k, torch.bfloat16, block_scales=True)
            configs = [QC(block_m=bm, block_n=bn, block_k=128, num_warps=w, num_stages=st)
                       for bm, bn, w in ((64, 128, 4), (128, 128, 8), (64, 64, 4), (32, 128, 4), (128, 64, 4))
                       for st in (3, 4) if bm <= max(32, triton_next_pow2(m))]
            results = []
            for cfg in dict.fromkeys([default] + configs):
                sec = time_in_graph([lambda w=w, cfg=cfg: qg.fp8_gemm(xq, xs, *w, torch.bfloat16, config=cfg)
                                     for w in fp8])
                results.append({**cfg.__dict__, "us": round(sec * 1e6, 2), "default": cfg == default})
            rows.append(_sweep_row("fp8_block", name, m, results))
        del fp8
        torch.cuda.empty_cache()
    return rows


def _sweep_row(method: str, proj: str, m: int, results: list[dict]) -> dict:
    best = min(results, key=lambda r: r["us"])
    row = {"method": method, "proj": proj, "m": m, "best": best,
           "default": next(r for r in results if r["default"]), "configs": results}
    print({key: v for key, v in row.items() if key != "configs"}, file=sys.stderr, flush=True)
    return row


def gate_up_silu_section(bandwidth: float, gen: torch.Generator) -> list[dict]:
    """The gate/up projection with SiLU-and-mul per method and GEMV batch: the fused kernel against the
    GEMV then silu_and_mul, in the same graph setup (weights cycled out of L2)."""
    from bench_kernels import num_sets, time_in_graph

    from carpool.ops import triton as tri

    _, n, k = GATE_UP
    rows = []
    for m in GATE_UP_BATCHES:
        bf16_fused = None
        for method in METHODS:
            sets = num_sets(weight_bytes(method, n, k))
            layers = [make_layer(method, n, k, gen, fused_gemv_silu=True) for _ in range(sets)]
            x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
            two = time_in_graph([lambda L=L, meth=meth: tri.silu_and_mul(meth.apply(L, x, None))
                                 for L, meth in layers])
            takes_fused = layers[0][1].apply_silu_and_mul(layers[0][0], x) is not None
            fused = time_in_graph([lambda L=L, meth=meth: meth.apply_silu_and_mul(L, x) for L, meth in layers]
                                  ) if takes_fused else None
            bf16_fused = fused if method == "bf16" else bf16_fused
            nbytes = gate_up_silu_bytes(method, m)
            row = {"batch": m, "method": method, "bytes": nbytes, "two_kernels_us": round(two * 1e6, 2),
                   "two_kernels_copy_roofline_ratio": round(nbytes / two / bandwidth, 3),
                   "fused_us": round(fused * 1e6, 2) if fused else None,
                   "fused_copy_roofline_ratio": round(nbytes / fused / bandwidth, 3) if fused else None,
                   "fused_vs_two_kernels": round(fused / two, 3) if fused else None,
                   "fused_vs_bf16_fused": round(fused / bf16_fused, 3) if fused and bf16_fused else None}
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
            del layers
            torch.cuda.empty_cache()
    return rows


SWEEP_BLOCK_N = (4, 8, 16, 32)
SWEEP_BLOCK_K = (256, 512, 1024, 2048, 4096)
SWEEP_WARPS = (4, 8)


def sweep_configs(method: str, m: int, k: int) -> list:
    """The QuantGemvConfigs swept for one method, batch and K: every block_n x block_k x num_warps whose
    step fits K and keeps a thread's weight bytes per step within 16-256 (below, too little in flight;
    above, the registers for the products of 8 rows of x spill), plus the default."""
    from carpool.ops.triton.quant_gemv import QuantGemvConfig, default_quant_gemv_config

    weight_bytes_per_col = 0.5 if method == "int4" else 1
    configs = [default_quant_gemv_config(m, k, int4=method == "int4")]
    if m == 1:  # the one-row kernels (one_row=True) beside the 1-8-row kernel's former batch-1 default
        configs.append(QuantGemvConfig(16 if method == "int4" else 8, 1024, 4, one_row=False))
        for bn in (4, 8, 16):
            for bk in (1024, 2048, 4096):
                if bn * bk * weight_bytes_per_col / 128 <= 128:  # weight bytes a thread holds per step
                    configs.append(QuantGemvConfig(bn, bk, 4))
        configs.append(QuantGemvConfig(8, 4096, 8))
        return list(dict.fromkeys(configs))
    for bn in SWEEP_BLOCK_N:
        for bk in SWEEP_BLOCK_K:
            for warps in SWEEP_WARPS:
                per_thread = bn * bk * weight_bytes_per_col / (32 * warps)
                if bk <= max(256, k) and 16 <= per_thread <= 256:
                    configs.append(QuantGemvConfig(bn, bk, warps))
    return list(dict.fromkeys(configs))


def sweep_section(bandwidth: float, gen: torch.Generator, gate_up_only: bool = False,
                  batches: tuple[int, ...] = GATE_UP_BATCHES,
                  methods: tuple[str, ...] = ("int4", "fp8", "fp8_block")) -> list[dict]:
    """QuantGemvConfigs per method (FP8 per channel, FP8 blocks, INT4), projection and batch (1, 4, 8),
    each timed in CUDA graphs over weights cycled out of L2, as a fraction of copy bandwidth; gate_up
    runs the fused SiLU-and-mul GEMV, the others the plain one. `best` is what the default should be."""
    from bench_kernels import num_sets, time_in_graph

    from carpool.ops.triton import quant_gemv as qg

    rows = []
    for method in methods:
        for name, n, k in ([GATE_UP] if gate_up_only else PROJECTIONS):
            silu = name == "gate_up"
            sets = num_sets(weight_bytes(method, n, k))
            layers = [make_layer(method, n, k, gen)[0] for _ in range(sets)]
            for m in batches:
                x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
                default = qg.default_quant_gemv_config(m, k, int4=method == "int4")
                nbytes = (gate_up_silu_bytes(method, m) if silu else weight_bytes(method, n, k) + 2 * m * (n + k))
                results = []
                for cfg in sweep_configs(method, m, k):
                    if method == "int4":
                        op = qg.int4_gemv_silu_and_mul if silu else qg.int4_gemv
                        calls = [lambda L=L, cfg=cfg, op=op: op(x, L.qweight, L.scales, L.qzeros, GROUP, config=cfg)
                                 for L in layers]
                    else:
                        op = qg.fp8_gemv_silu_and_mul if silu else qg.fp8_gemv
                        calls = [lambda L=L, cfg=cfg, op=op: op(x, L.weight, _fp8_scale(L), config=cfg)
                                 for L in layers]
                    sec = time_in_graph(calls)
                    results.append({"block_n": cfg.block_n, "block_k": cfg.block_k, "num_warps": cfg.num_warps,
                                    "one_row": cfg.one_row and m == 1,
                                    "us": round(sec * 1e6, 2), "default": cfg == default,
                                    "copy_roofline_ratio": round(nbytes / sec / bandwidth, 3)})
                best = min(results, key=lambda r: r["us"])
                row = {"method": method, "proj": name, "n": n, "k": k, "batch": m, "fused_silu": silu,
                       "best": best, "default": next(r for r in results if r["default"]), "configs": results}
                print({key: v for key, v in row.items() if key != "configs"}, file=sys.stderr, flush=True)
                rows.append(row)
            del layers
            torch.cuda.empty_cache()
    return rows


def _fp8_scale(layer: Any) -> torch.Tensor:
    """The FP8 scale a make_layer layer holds (its name follows the checkpoint format)."""
    return next(v for key, v in vars(layer).items() if "scale" in key)


# --- quality (CPU or GPU) -------------------------------------------------------------------------------------

QUALITY_MODEL = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=2048, hidden_size=512,
                     intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                     head_dim=64, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                     tie_word_embeddings=False, torch_dtype="float32")


def _fake_quantize(method: str, w: torch.Tensor) -> torch.Tensor:
    """w rounded through the method's format and back (float32): what its kernels multiply by."""
    from carpool.quantization.formats import quantize_fp8_per_block, quantize_fp8_per_channel

    if method in ("fp8", "fp8_w8a8"):
        q, s = quantize_fp8_per_channel(w)
        return q.float() * s[:, None]
    if method == "fp8_block":
        q, s = quantize_fp8_per_block(w, FP8_BLOCK)
        return q.float() * s.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
    if method == "bf16":
        return w.to(torch.bfloat16).float()
    # int4, AWQ-style: min-max per group of 128 input columns, zero points, scales rounded to fp16
    g = w.float().unflatten(1, (-1, GROUP))
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15)
    return ((q - zero[..., None]) * scale[..., None]).flatten(1)


def quality_section(device: str, tokens: int = 256, seed: int = 0) -> list[dict]:
    """Logits of a random-weight Llama (QUALITY_MODEL, weights normal with std 0.05) under each method,
    against the float32 model: the largest |logit error| (absolute, and relative to the largest |logit|)
    and how often the top-1 token agrees. FP8 W8A8 also rounds each layer's input per token to e4m3
    (torch_ref.quant.w8a8_linear); the FP8 KV cache runs attention over e4m3 K/V (scales 1)."""
    from carpool.config import ModelConfig
    from carpool.forward_batch import AttentionMetadata, ForwardBatch
    from carpool.layers.linear import LinearBase
    from carpool.models.loader import build_model, init_dummy_weights
    from carpool.models.runtime import ModelRuntime
    from carpool.ops.torch_ref import quant as ref
    from carpool.quantization.config import KVCacheScheme

    config = ModelConfig.from_hf_config(QUALITY_MODEL, dtype="float32")
    ids = torch.randint(0, QUALITY_MODEL["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(seed))

    def logits(method: str, kv_fp8: bool) -> torch.Tensor:
        runtime = ModelRuntime.for_inference("torch", kv_cache=KVCacheScheme("fp8" if kv_fp8 else "auto"))
        model = build_model(config, runtime, device)
        init_dummy_weights(model, seed=seed, std=0.05)
        for m in model.modules():
            if isinstance(m, LinearBase) and method != "fp32":
                with torch.no_grad():
                    m.weight.copy_(_fake_quantize(method, m.weight.float()))
                if method == "fp8_w8a8":  # (the layer's own method object: this layer's apply only)
                    m.method.apply = w8a8_apply
        for layer in model.attention_layers():
            shape = (tokens // 16 + 1, 16, layer.num_kv_heads, layer.head_dim)
            dtype = torch.float8_e4m3fn if kv_fp8 else torch.float32
            layer.k_cache, layer.v_cache = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(
                shape, dtype=dtype, device=device)
        nb = tokens // 16 + 1
        meta = AttentionMetadata(torch.tensor([0, tokens], dtype=torch.int32, device=device),
                                 torch.tensor([tokens], dtype=torch.int32, device=device),
                                 torch.arange(nb, dtype=torch.int32, device=device)[None],
                                 torch.arange(tokens, device=device), tokens, tokens, [0, tokens], [tokens])
        batch = ForwardBatch(ids.to(device), torch.arange(tokens, device=device), meta)
        with torch.no_grad():
            return model.compute_logits(model(batch.input_ids, batch.positions, batch)).float().cpu()

    def w8a8_apply(layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from carpool.quantization.formats import quantize_fp8_per_channel

        weight, scale = quantize_fp8_per_channel(layer.weight)  # (exact: the weight already is e4m3 x scale)
        xq, x_scale = ref.quantize_fp8_activations(x)
        return ref.w8a8_linear(xq, x_scale, weight, scale, None, x.dtype, bias)

    expected = logits("fp32", False)
    rows = []
    for method, kv_fp8 in (("bf16", False), ("fp8", False), ("fp8_w8a8", False), ("fp8_block", False),
                           ("int4", False), ("fp32", True), ("fp8_w8a8", True)):
        got = logits(method, kv_fp8)
        err = (got - expected).abs()
        row = {"weights": method, "kv_cache": "fp8" if kv_fp8 else "float32",
               "max_abs_logit_error": round(err.max().item(), 4),
               "max_rel_logit_error": round(err.max().item() / expected.abs().max().item(), 4),
               "top1_agreement": round((got.argmax(-1) == expected.argmax(-1)).float().mean().item(), 4)}
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="decode at batch 1 and 64, selector at 4 sizes")
    ap.add_argument("--sweep", action="store_true", help="also sweep the GEMV and GEMM launch configs")
    ap.add_argument("--gemm", action="store_true",
                    help="only the GEMM sections: decode at batch 64, prefill, backends (and the GEMM sweep with "
                         "--sweep)")
    ap.add_argument("--gate-up-silu", action="store_true",
                    help="only the gate/up + SiLU-and-mul section: fused GEMV against GEMV then silu_and_mul")
    ap.add_argument("--batch-one", action="store_true",
                    help="only batch 1: the decode section, and with --sweep the GEMV sweep (both kernels)")
    ap.add_argument("--sweep-methods", default="int4,fp8,fp8_block", help="--sweep: the GEMV sweep's methods")
    ap.add_argument("--dry-run", action="store_true", help="list the cases with bytes and FLOPs (no GPU)")
    ap.add_argument("--quality", action="store_true",
                    help="only the logit error of each method on a random-weight model (runs on CPU too)")
    args = ap.parse_args()
    if args.dry_run:
        emit(dry_run(), args.out)
        return
    if args.quality:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        emit({"benchmark": "quant/quality-random-llama", "device": device, "model": QUALITY_MODEL,
              "reference": "float32 weights and KV cache", "quality": quality_section(device)}, args.out)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant needs a CUDA GPU (compute capability >= 8.9 for FP8); --dry-run lists the cases")
    import triton

    from common import measure_copy_bandwidth, measure_matmul_flops

    from carpool.ops.triton import utils as triton_utils

    triton_utils.choose_pdl(torch.device("cuda"), disabled=False)  # as the engine launches them
    gen = torch.Generator(device="cuda").manual_seed(0)
    bandwidth = measure_copy_bandwidth()
    bf16_flops, fp8_flops = measure_matmul_flops(), measure_fp8_flops()
    report: dict[str, Any] = {
        "benchmark": "quant/llama3-8b-layer", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "pdl": triton_utils.pdl(), "copy_gb_per_s": round(bandwidth / 1e9, 1),
        "bf16_tflops": round(bf16_flops / 1e12, 1), "fp8_tflops": round(fp8_flops / 1e12, 1),
        "projections": PROJECTIONS}
    if args.batch_one:
        report["decode"] = decode_section(bandwidth, (1,), gen)
        if args.sweep:
            report["gemv_sweep"] = sweep_section(bandwidth, gen, batches=(1,),
                                                 methods=tuple(args.sweep_methods.split(",")))
        emit(report, args.out)
        return
    if args.gate_up_silu:
        report["gate_up_silu"] = gate_up_silu_section(bandwidth, gen)
        if args.sweep:
            report["gemv_sweep"] = sweep_section(bandwidth, gen, gate_up_only=True)
        emit(report, args.out)
        return
    if args.gemm:
        report["decode"] = decode_section(bandwidth, (64,), gen)
        report["prefill"] = prefill_section(bf16_flops, fp8_flops, gen)
        report["backends"] = backends_section(gen, BACKEND_M_QUICK if args.quick else BACKEND_M)
        if args.sweep:
            report["gemm_sweep"] = gemm_sweep_section(gen)
        emit(report, args.out)
        return
    report["decode"] = decode_section(bandwidth, (1, 64) if args.quick else DECODE_BATCHES, gen)
    report["prefill"] = prefill_section(bf16_flops, fp8_flops, gen)
    report["backends"] = backends_section(gen, BACKEND_M_QUICK if args.quick else BACKEND_M)
    report["fp8_gemm_backend"] = selector_section(gen, (16, 64, 512, 8192) if args.quick else SELECTOR_M)
    report["gate_up_silu"] = gate_up_silu_section(bandwidth, gen)
    if args.sweep:
        report["gemv_sweep"] = sweep_section(bandwidth, gen)
        report["gemm_sweep"] = gemm_sweep_section(gen)
    emit(report, args.out)


if __name__ == "__main__":
    main()
