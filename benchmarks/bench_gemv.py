"""Batch-1 projections: the Triton GEMV (carpool/ops/triton/gemv.py) against cuBLAS (torch.nn.functional.linear)
on the Llama-3-8B shapes, whole and split for TP=2, as a fraction of measured copy bandwidth.

Each case is timed inside a CUDA graph that cycles through enough weight copies (>= 512 MiB) that no call
finds its matrix in L2, as a decode step would not. Prints one JSON object.

    python benchmarks/bench_gemv.py [--out FILE] [--quick]
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
from common import emit, measure_copy_bandwidth  # noqa: E402

from carpool.ops.triton.gemv import GemvConfig, default_gemv_config, gemv  # noqa: E402

# (name, N, K): Llama-3-8B projections, then their TP=2 halves (column-parallel halve N, row-parallel K)
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("qkv/2", 3072, 4096), ("o/2", 4096, 2048), ("gate_up/2", 14336, 4096), ("down/2", 4096, 7168)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="the engine's config for each shape only")
    args = ap.parse_args()
    bandwidth = measure_copy_bandwidth()
    sweep = [
        GemvConfig(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
        for bn, bk, w, st in ((4, 1024, 4, 3), (2, 1024, 4, 3), (8, 512, 4, 3), (4, 512, 4, 4), (8, 1024, 8, 3),
                              (2, 2048, 8, 3), (16, 256, 4, 4), (4, 2048, 8, 2), (1, 2048, 4, 4))]
    results = []
    for name, n, k in SHAPES:
        nbytes = n * k * 2 + k * 2 + n * 2
        sets = num_sets(nbytes)
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5 for _ in range(sets)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        ref = F.linear(x.float(), ws[0].float())
        configs = [default_gemv_config(k)] + ([] if args.quick else sweep)
        cublas = time_in_graph([(lambda w=w: F.linear(x, w)) for w in ws])
        row = {"case": name, "n": n, "k": k, "bytes": nbytes,
               "cublas_us": round(cublas * 1e6, 2), "cublas_ratio": round(nbytes / cublas / bandwidth, 3), "triton": []}
        for cfg in configs:
            err = (gemv(x, ws[0], config=cfg).float() - ref).abs().max().item()
            sec = time_in_graph([(lambda w=w, cfg=cfg: gemv(x, w, config=cfg)) for w in ws])
            row["triton"].append({"block_n": cfg.block_n, "block_k": cfg.block_k, "num_warps": cfg.num_warps,
                                  "num_stages": cfg.num_stages, "us": round(sec * 1e6, 2),
                                  "ratio": round(nbytes / sec / bandwidth, 3), "max_abs_err": err})
        row["engine_config"] = row["triton"][0]  # what the engine runs for this shape (default_gemv_config)
        best = max(row["triton"], key=lambda t: t["ratio"])
        row["best_triton"] = best
        progress({key: v for key, v in row.items() if key != "triton"})
        results.append(row)
        del ws
        torch.cuda.empty_cache()
    report = {"benchmark": "gemv/batch1", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "copy_gb_per_s": round(bandwidth / 1e9, 1), "cases": results}
    emit(report, args.out)


if __name__ == "__main__":
    main()
