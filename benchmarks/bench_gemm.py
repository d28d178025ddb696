"""Decode-batch projections: the Triton GEMM (carpool/ops/triton/gemm.py) against cuBLAS
(torch.nn.functional.linear) on the Qwen3-0.6B shapes at batch 16-256, with programmatic dependent launch
on as in the engine.

Each case is timed inside a CUDA graph that cycles through enough weight copies that no call finds its
matrix in L2, as in a decode step. Two timings per contender: the product alone (back to back), and
after an RMSNorm that writes its input (`after_norm_us`), which is how the engine calls it: there the
Triton GEMM overlaps its launch and first weight tile with the norm, and cuBLAS cannot. The limit per
case is max(bytes / B, FLOPs / F) with B and F measured in the same run. Prints one JSON object.

    python benchmarks/bench_gemm.py [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import num_sets, progress, time_in_graph  # noqa: E402
from common import emit, measure_copy_bandwidth, measure_matmul_flops  # noqa: E402

from carpool.ops.triton import utils  # noqa: E402
from carpool.ops.triton.elementwise import rms_norm  # noqa: E402
from carpool.ops.triton.gemm import GemmConfig, default_gemm_config, gemm  # noqa: E402

# (name, N, K): Qwen3-0.6B projections (hidden 1024, 16 + 2 x 8 heads of 128, intermediate 3072)
SHAPES = [("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072)]
BATCHES = [16, 64, 128, 256]


def sweep(m: int) -> list[GemmConfig]:
    block_ms = [min(64, max(16, triton.next_power_of_2(m)))] + ([128] if m >= 128 else [])
    # (shared memory per stage: (block_m + block_n) * block_k * 2 bytes; 227 KB per SM on H100/H200)
    return [GemmConfig(block_m=bm, block_n=bn, block_k=bk, num_warps=8 if bm == 128 else 4,
                       num_stages=4 if bk == 64 else 2 if bm + bn > 160 else 3)
            for bm in block_ms for bn in (32, 64, 128) for bk in (64, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="the engine's config for each case only")
    args = ap.parse_args()
    utils.set_pdl(utils.pdl_supported(torch.device("cuda")))
    bandwidth, flops = measure_copy_bandwidth(), measure_matmul_flops()
    results = []
    for name, n, k in SHAPES:
        for m in BATCHES:
            nbytes = 2 * (n * k + m * k + m * n)
            limit = max(nbytes / bandwidth, 2 * m * n * k / flops)
            sets = num_sets(nbytes)
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5 for _ in range(sets)]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            norm_w = torch.ones(k, dtype=torch.bfloat16, device="cuda")
            ref = F.linear(x.float(), ws[0].float())

            def timed(fn, ws: list[torch.Tensor] = ws) -> dict:  # type: ignore[no-untyped-def]
                alone = time_in_graph([(lambda w=w: fn(x, w)) for w in ws])
                after = time_in_graph([(lambda w=w: fn(rms_norm(x, norm_w, 1e-6), w)) for w in ws])
                return {"us": round(alone * 1e6, 2), "after_norm_us": round(after * 1e6, 2),
                        "ratio": round(limit / alone, 3)}

            row = {"case": name, "m": m, "n": n, "k": k, "limit_us": round(limit * 1e6, 2),
                   "cublas": timed(F.linear), "triton": []}
            configs = [default_gemm_config(m, n, k)] + ([] if args.quick else sweep(m))
            for cfg in configs:
                err = (gemm(x, ws[0], config=cfg).float() - ref).abs().max().item()
                sec = time_in_graph([(lambda w=w, cfg=cfg: gemm(x, w, config=cfg)) for w in ws])
                row["triton"].append({"block_m": cfg.block_m, "block_n": cfg.block_n, "block_k": cfg.block_k,
                                      "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                      "us": round(sec * 1e6, 2), "ratio": round(limit / sec, 3), "max_abs_err": err})
            engine_cfg = configs[0]
            best = min(range(len(configs)), key=lambda i: row["triton"][i]["us"])
            row["engine_config"] = {**row["triton"][0], **timed(lambda a, w: gemm(a, w, config=engine_cfg))}
            best_cfg = configs[best]
            row["best_triton"] = {**row["triton"][best], **timed(lambda a, w: gemm(a, w, config=best_cfg))}
            progress({key: v for key, v in row.items() if key != "triton"})
            results.append(row)
            del ws, timed
            torch.cuda.empty_cache()
    report = {"benchmark": "gemm/decode", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "pdl": utils.pdl(), "copy_gb_per_s": round(bandwidth / 1e9, 1),
              "bf16_tflops": round(flops / 1e12, 1), "cases": results}
    emit(report, args.out)


if __name__ == "__main__":
    main()
