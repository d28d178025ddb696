"""Batch-1 projections: the Triton GEMV (carpool/ops/triton/gemv.py) against cuBLAS (torch.nn.functional.linear)
on the Llama-3-8B shapes, whole and split for TP=2, as a fraction of measured copy bandwidth.

Each case is timed inside a CUDA graph that cycles through enough weight copies (>= 512 MiB) that no call
finds its matrix in L2, as a decode step would not. Prints one JSON object.

    python benchmarks/bench_gemv.py [--out FILE] [--quick] [--push] [--qk-norm]

--push: the TP=2 row-parallel shapes (o/2, down/2) as the batch-1 push exchange runs them
(ops/triton/gemv.py gemv_push, under PDL like the engine): plain, pushing into two slot rows on this
GPU, and (with a second GPU) pushing one of them into the peer's memory over NVLink; each with the
engine's config and a few others. Separates the cost of pushing, and of pushing across NVLink, from the
GEMV's own.

--rows: steps of 2-16 rows (small-batch decode, speculative verification of k + 1 tokens) on the 8B
projections, whole: the multi-row GEMV (gemv_rows, KernelConfig.small_batch_gemv; gate_up also as
gemv_rows_silu_and_mul) with its default config and a sweep, against cuBLAS (and cuBLAS + silu_and_mul for
gate_up), as fractions of copy bandwidth, under PDL as the engine runs them. `faster_than_cublas` per
shape and M decides whether the flag should default on.

--qk-norm: a batch-1 Qwen3 layer's q/k/v projection (the SHAPES of benchmarks/common.py with a q/k norm),
under PDL: as the engine runs it (the GEMV, then one kernel for the per-head q/k RMSNorm, RoPE and the
KV-cache store), against Llama's one kernel for the same shape (gemv_rope_and_store_kv: the GEMV with
RoPE and the store, no norm), the GEMV alone, and the GEMV with one head's rows per program (what a GEMV
holding a whole head for its norm would stream). Two_kernels - fused is what folding the norm into the
GEMV could save per layer at most; per_head against gemv is what a program per head would cost.
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
from common import SHAPES as MODEL_SHAPES  # noqa: E402
from common import emit, measure_copy_bandwidth  # noqa: E402

from carpool.ops.triton import utils as triton_utils  # noqa: E402
from carpool.ops.triton.elementwise import rope_and_store_kv, silu_and_mul  # noqa: E402
from carpool.ops.triton.gemv import (  # noqa: E402
    GemvConfig,
    GemvRowsConfig,
    default_gemv_config,
    default_gemv_rows_config,
    gemv,
    gemv_push,
    gemv_rope_and_store_kv,
    gemv_rows,
    gemv_rows_silu_and_mul,
)

# (name, N, K): Llama-3-8B projections, then their TP=2 halves (column-parallel halve N, row-parallel K)
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
          ("qkv/2", 3072, 4096), ("o/2", 4096, 2048), ("gate_up/2", 14336, 4096), ("down/2", 4096, 7168)]


PUSH_SHAPES = [("o", 4096, 4096), ("down", 4096, 14336), ("o/2", 4096, 2048), ("down/2", 4096, 7168)]
PUSH_SWEEP = ((2, 1024, 4, 3), (2, 1024, 8, 3), (2, 2048, 4, 3), (2, 2048, 8, 3), (2, 512, 4, 4))


def push_cases(bandwidth: float) -> list[dict]:
    """Per shape and config: µs per call plain, pushing locally, pushing to the peer GPU."""
    triton_utils.choose_pdl(torch.device("cuda"), disabled=False)
    peer = torch.cuda.device_count() > 1 and torch.cuda.can_device_access_peer(0, 1)
    stride = 4096  # slots per rank and half (N/2 = 2048 used)
    local = torch.zeros(2 * 2 * stride, dtype=torch.int64, device="cuda")
    local_ptrs = torch.tensor([local.data_ptr(), local.data_ptr()], dtype=torch.int64, device="cuda")
    remote_ptrs = None
    if peer:
        remote = torch.zeros(2 * 2 * stride, dtype=torch.int64, device="cuda:1")
        torch.zeros(1, device="cuda:1").copy_(torch.zeros(1, device="cuda:0"))  # (enables peer access both
        torch.zeros(1, device="cuda:0").copy_(torch.zeros(1, device="cuda:1"))  # ways, as torch copies do)
        remote_ptrs = torch.tensor([local.data_ptr(), remote.data_ptr()], dtype=torch.int64, device="cuda")
    epoch = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = []
    for name, n, k in PUSH_SHAPES:
        nbytes = n * k * 2 + k * 2 + n * 2
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5 for _ in range(num_sets(nbytes))]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        plain_cfg, push_cfg = default_gemv_config(k), default_gemv_config(k, push=True)
        configs = list(dict.fromkeys([plain_cfg, push_cfg] + [GemvConfig(*c) for c in PUSH_SWEEP]))
        for cfg in configs:
            row = {"case": name, "n": n, "k": k, "block_k": cfg.block_k, "num_warps": cfg.num_warps,
                   "num_stages": cfg.num_stages, "engine_config_plain": cfg == plain_cfg,
                   "engine_config_push": cfg == push_cfg}
            modes = [("plain", lambda w, cfg=cfg: gemv(x, w, config=cfg)),
                     ("push_local", lambda w, cfg=cfg: gemv_push(x, w, local_ptrs, epoch, stride, 0, 2, cfg))]
            if remote_ptrs is not None:
                modes.append(("push_peer", lambda w, cfg=cfg: gemv_push(x, w, remote_ptrs, epoch, stride, 0, 2, cfg)))
            for mode, call in modes:
                sec = time_in_graph([(lambda w=w, call=call: call(w)) for w in ws])
                row[f"{mode}_us"] = round(sec * 1e6, 2)
                row[f"{mode}_ratio"] = round(nbytes / sec / bandwidth, 3)
            progress(row)
            rows.append(row)
        if remote_ptrs is not None:  # the words arrived: the peer's slot row holds this call's epoch
            torch.cuda.synchronize()
            # (epoch 0 + 1 = 1: half 1, rank 0 -> slot row 2)
            assert int(remote[2 * stride].item()) >> 32 == 1, "no pushed word reached the peer"
        del ws
        torch.cuda.empty_cache()
    return rows


# GEMV configs of one head's rows per program (block_n = head_dim): (block_k, num_warps, num_stages)
PER_HEAD_SWEEP = ((32, 4, 3), (64, 8, 3), (128, 8, 2))


def qk_norm_shapes() -> list[tuple[str, dict]]:
    """(name, config) of the model shapes whose attention has a per-head q/k RMSNorm (Qwen3, dense and MoE)."""
    return [(name, cfg) for name, cfg in MODEL_SHAPES.items() if cfg["model_type"] in ("qwen3", "qwen3_moe")]


def qk_norm_calls(cfg: dict, ws: list[torch.Tensor], device: str) -> dict[str, list]:
    """Per case, one call per weight copy in `ws` ([(heads + 2 kv heads) * head_dim, hidden] each)."""
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    dtype = ws[0].dtype
    x = torch.randn(1, cfg["hidden_size"], dtype=dtype, device=device)
    positions = torch.tensor([100], device=device)
    slots = torch.tensor([37], device=device)
    cos_sin = torch.randn(128, head_dim, device=device)  # float32, as RotaryEmbedding keeps it
    k_cache, v_cache = (torch.zeros(8, 16, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
    q_weight, k_weight = (torch.rand(head_dim, dtype=dtype, device=device) + 0.5 for _ in range(2))
    q_size, kv_size = heads * head_dim, kv_heads * head_dim

    def two_kernels(w: torch.Tensor) -> torch.Tensor:
        q, k, v = gemv(x, w).split([q_size, kv_size, kv_size], dim=-1)
        return rope_and_store_kv(positions, q.view(1, heads, head_dim), k.view(1, kv_heads, head_dim),
                                 v.view(1, kv_heads, head_dim), cos_sin, k_cache, v_cache, slots, q_weight, k_weight,
                                 cfg["rms_norm_eps"])

    def fused(w: torch.Tensor) -> torch.Tensor:
        return gemv_rope_and_store_kv(x, w, None, positions, cos_sin, k_cache, v_cache, slots, heads, kv_heads)

    calls = {"two_kernels": [lambda w=w: two_kernels(w) for w in ws],
             "fused_without_norm": [lambda w=w: fused(w) for w in ws],
             "gemv": [lambda w=w: gemv(x, w) for w in ws]}
    for bk, warps, stages in PER_HEAD_SWEEP:
        config = GemvConfig(block_n=head_dim, block_k=bk, num_warps=warps, num_stages=stages)
        calls[f"per_head_gemv_k{bk}_w{warps}_s{stages}"] = [lambda w=w, c=config: gemv(x, w, config=c) for w in ws]
    return calls


def qk_norm_cases(bandwidth: float) -> list[dict]:
    """Per Qwen3 shape: µs per layer of each case, its fraction of the byte roofline, and the savings."""
    triton_utils.choose_pdl(torch.device("cuda"), disabled=False)
    rows = []
    for name, cfg in qk_norm_shapes():
        n = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * cfg["head_dim"]
        k = cfg["hidden_size"]
        nbytes = n * k * 2 + k * 2 + n * 2
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5 for _ in range(num_sets(nbytes))]
        row: dict = {"shape": name, "n": n, "k": k, "layers": cfg["num_hidden_layers"],
                     "roofline_us": round(nbytes / bandwidth * 1e6, 2)}
        for case, calls in qk_norm_calls(cfg, ws, "cuda").items():
            sec = time_in_graph(calls)
            row[f"{case}_us"] = round(sec * 1e6, 2)
            row[f"{case}_ratio"] = round(nbytes / sec / bandwidth, 3)
        per_head = min((key for key in row if key.startswith("per_head_gemv") and key.endswith("_us")),
                       key=lambda key: row[key])
        row["best_per_head_gemv"] = per_head
        saving = row["two_kernels_us"] - row["fused_without_norm_us"]
        row["norm_kernel_cost_us"] = round(saving, 2)
        row["norm_kernel_cost_ms_per_token"] = round(saving * cfg["num_hidden_layers"] / 1e3, 3)
        row["per_head_over_gemv_us"] = round(row[per_head] - row["gemv_us"], 2)
        progress(row)
        rows.append(row)
        del ws
        torch.cuda.empty_cache()
    return rows


ROWS = (2, 3, 4, 5, 6, 8, 9, 16)
ROWS_SWEEP = ((16, 256, 4, 4), (32, 128, 4, 4), (32, 512, 4, 3), (64, 256, 4, 4), (64, 128, 8, 4), (32, 256, 8, 5))


def rows_cases(bandwidth: float, quick: bool) -> list[dict]:
    """Per projection and M: µs and fraction of the byte roofline of cuBLAS and of gemv_rows per config."""
    triton_utils.choose_pdl(torch.device("cuda"), disabled=False)
    default = default_gemv_rows_config()
    configs = [default] + ([] if quick else [c for c in (GemvRowsConfig(*t) for t in ROWS_SWEEP) if c != default])
    rows = []
    for name, n, k in SHAPES[:4]:
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
              for _ in range(num_sets(n * k * 2))]
        for m in ROWS:
            nbytes = n * k * 2 + m * k * 2 + m * n * 2
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = F.linear(x.float(), ws[0].float())
            cublas = time_in_graph([(lambda w=w: F.linear(x, w)) for w in ws])
            row: dict = {"case": name, "n": n, "k": k, "m": m, "cublas_us": round(cublas * 1e6, 2),
                         "cublas_ratio": round(nbytes / cublas / bandwidth, 3), "triton": []}
            if name == "gate_up":
                sec = time_in_graph([(lambda w=w: silu_and_mul(F.linear(x, w))) for w in ws])
                row["cublas_silu_us"] = round(sec * 1e6, 2)
            for cfg in configs:
                err = (gemv_rows(x, ws[0], config=cfg).float() - ref).abs().max().item()
                sec = time_in_graph([(lambda w=w, cfg=cfg: gemv_rows(x, w, config=cfg)) for w in ws])
                t = {"block_n": cfg.block_n, "block_k": cfg.block_k, "num_warps": cfg.num_warps,
                     "num_stages": cfg.num_stages, "us": round(sec * 1e6, 2),
                     "ratio": round(nbytes / sec / bandwidth, 3), "max_abs_err": err}
                if name == "gate_up":
                    sec = time_in_graph([(lambda w=w, cfg=cfg: gemv_rows_silu_and_mul(x, w, cfg)) for w in ws])
                    t["silu_us"] = round(sec * 1e6, 2)
                row["triton"].append(t)
            row["engine_config"] = row["triton"][0]
            row["best_triton"] = max(row["triton"], key=lambda t: t["ratio"])
            row["faster_than_cublas"] = row["engine_config"]["us"] < row["cublas_us"]
            progress({key: v for key, v in row.items() if key != "triton"})
            rows.append(row)
        del ws
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true", help="the engine's config for each shape only")
    ap.add_argument("--push", action="store_true", help="the row-parallel shapes plain and pushing (see above)")
    ap.add_argument("--qk-norm", action="store_true", help="Qwen3's q/k/v projection with its q/k norm (see above)")
    ap.add_argument("--rows", action="store_true", help="steps of 2-16 rows: gemv_rows against cuBLAS (see above)")
    args = ap.parse_args()
    bandwidth = measure_copy_bandwidth()
    if args.rows:
        cases = rows_cases(bandwidth, args.quick)  # (turns PDL on, as the engine does)
        emit({"benchmark": "gemv/rows", "device": torch.cuda.get_device_name(), "pdl": triton_utils.pdl(),
              "torch": torch.__version__, "triton": triton.__version__,
              "copy_gb_per_s": round(bandwidth / 1e9, 1), "cases": cases}, args.out)
        return
    if args.qk_norm:
        cases = qk_norm_cases(bandwidth)  # (turns PDL on, as the engine does)
        emit({"benchmark": "gemv/batch1-qk-norm", "device": torch.cuda.get_device_name(), "pdl": triton_utils.pdl(),
              "copy_gb_per_s": round(bandwidth / 1e9, 1), "cases": cases}, args.out)
        return
    if args.push:
        cases = push_cases(bandwidth)  # (turns PDL on, as the engine does)
        emit({"benchmark": "gemv/batch1-push", "device": torch.cuda.get_device_name(), "pdl": triton_utils.pdl(),
              "copy_gb_per_s": round(bandwidth / 1e9, 1), "cases": cases}, args.out)
        return
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
