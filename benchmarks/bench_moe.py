"""Fused MoE kernel vs a torch loop of per-expert GEMMs at the Qwen3-30B-A3B expert shape.

The kernel alone (carpool/ops/triton/moe.py) against the torch loop (ops/torch_ref/moe.py,
transformers' eager loop): hidden 2048, 128 experts, top-8, expert intermediate 768, bf16. Prints one
JSON object.

    python benchmarks/bench_moe.py [--out FILE] [--batches 1,64,256] [--quick] [--tensor-parallel-size N]
                                   [--fp8 block|channel] [--int4 awq|gptq]
    python benchmarks/bench_moe.py --quick --batches 1,2,4,8   # the routing comparison (`block`) alone

Roofline: a step must read the weights (w13 and w2) of every distinct expert its tokens chose, plus its
hidden rows in and out, at the copy bandwidth measured in the same run; `ratio` = roofline time / time
(1.0 = at copy bandwidth). Routings come from random router logits through Qwen3-MoE routing; each timed
graph cycles through several routings, and batch 1's routings choose disjoint experts, so no call finds
its experts in L2 as a decode step would not. The expected number of distinct experts for uniform
routing, E * (1 - (1 - k/E)^T), is stated beside the measured mean.

Per batch: the engine's default path (`fused_us`, in a CUDA graph, and eager), both paths forced at
batches up to 16 (where `FusedMoeConfig.small_batch_max_tokens` is decided), a few grouped-GEMM tiles
(`sweep`, unless --quick), and the torch loop (eager: it asks the host which experts were hit).

Routing (`block`, batches up to 16): the whole MoE block after its norm, router GEMV included, in a
CUDA graph with PDL on (as the engine runs it) and off, both ways the engine can route:
`torch_routing` (KernelConfig.fused_moe_routing off: Routing.select's softmax, topk, sum, divide and cast
as torch kernels, then fused_moe) and `fused_routing` (on: fused_moe_routed, which routes in one Triton
kernel). Batch 1 of Qwen3-30B-A3B is then 4 kernels instead of 8, all under PDL;
`saved_ms_per_token_48_layers` is the difference times the model's 48 MoE layers. (The router GEMV's
logits are computed and dropped: each call routes from prepared logits, so that batch 1 cycles through
disjoint experts as above.)

With --tensor-parallel-size N, each batch also times one rank's share of the layer under both ways of
splitting the experts over N GPUs, on this one GPU (`rank_share`): `intermediate_split` (the default:
every expert, I / N of its rows) and `expert_parallel` (--enable-expert-parallel: E / N whole experts,
the kernel skipping the pairs of other ranks' experts), the latter for every rank r, since a step waits
for its slowest rank. Each has its roofline ratio (the bytes that rank must read). The all-reduce is the
same size either way and is not timed here; bench_throughput/bench_latency with -tp N and
--enable-expert-parallel measure the whole engine.

With --fp8 block (Qwen3-30B-A3B-FP8's 128x128 scales) or --fp8 channel (llm-compressor's per-channel
FP8), each batch also times the same experts quantized to e4m3 (W8A16: the kernels dequantize in
registers) beside the bf16 run (`fp8`): its default path in a CUDA graph, both paths forced at small
batches, its roofline ratio (one byte per weight plus the scales), `fp8_over_bf16` (time ratio, < 1 is
faster; the bytes alone would give ~0.5 at small batches) and the max error against the torch loop on
the dequantized weights in float32.

With --int4 awq (AutoAWQ's layout as carpool holds it: 4-bit, group 128, bf16 scales and zero points) or
--int4 gptq (symmetric: no zeros), each batch also times the experts in 4 bits (`int4`, W4A16: the kernels
unpack and dequantize in registers) the same way: roofline ratio (half a byte per weight plus a scale,
and a zero, per 128-column group of each row), `int4_over_bf16` (the bytes alone would give ~0.27 at
small batches) and the max error against the torch loop on the dequantized weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import progress, time_in_graph  # noqa: E402
from common import emit, measure_copy_bandwidth  # noqa: E402

from carpool.layers.moe import Routing  # noqa: E402
from carpool.ops.torch_ref.moe import fused_moe as torch_loop_moe  # noqa: E402
from carpool.ops.triton import utils as triton_utils  # noqa: E402
from carpool.ops.triton.gemv import gemv  # noqa: E402
from carpool.ops.triton.moe import (  # noqa: E402
    FusedMoeConfig,
    GroupedGemmConfig,
    default_moe_config,
    fused_moe,
    fused_moe_routed,
)
from carpool.quantization.moe_methods import quantize_fp8_experts, quantize_int4_experts  # noqa: E402
from carpool.utils import cdiv  # noqa: E402

HIDDEN, NUM_EXPERTS, TOP_K, INTER = 2048, 128, 8, 768
DTYPE_BYTES = 2
INT4_GROUP = 128
ROUTINGS = 16  # routings per timed graph (batch 1: 16 disjoint sets of 8 experts cover all 128)
PATH_SPLIT_MAX = 16  # batches up to this are also timed with each path forced
SWEEP = [GroupedGemmConfig(16, 64, 128, 1, 4, 3), GroupedGemmConfig(16, 128, 64, 1, 4, 4),
         GroupedGemmConfig(32, 64, 64, 4, 4, 3), GroupedGemmConfig(32, 128, 64, 4, 4, 3),
         GroupedGemmConfig(64, 64, 64, 8, 4, 3), GroupedGemmConfig(64, 128, 64, 8, 8, 3),
         GroupedGemmConfig(128, 128, 64, 8, 8, 3)]


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Mean number of distinct experts chosen by num_tokens tokens that each pick top_k of num_experts
    uniformly (a given expert is missed by one token with probability 1 - k/E)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def step_bytes(topk_ids: torch.Tensor, hidden: int, inter: int, dtype_bytes: int = DTYPE_BYTES) -> int:
    """What a step must move at least: each distinct chosen expert's w13 [2I, H] and w2 [H, I] once, and
    the tokens' hidden rows in and out."""
    distinct = int(torch.unique(topk_ids).numel())
    return distinct * 3 * hidden * inter * dtype_bytes + 2 * topk_ids.shape[0] * hidden * dtype_bytes


def fp8_scale_bytes(distinct: int, hidden: int, inter: int, block: bool) -> int:
    """float32 scales a step reads beside the e4m3 weights of `distinct` experts: per 128x128 block of
    gate, up and down, or per output channel (2I for w13, H for w2)."""
    per_expert = 3 * cdiv(inter, 128) * cdiv(hidden, 128) if block else 2 * inter + hidden
    return distinct * per_expert * 4


def fp8_step_bytes(topk_ids: torch.Tensor, hidden: int, inter: int, block: bool) -> int:
    """step_bytes with one byte per weight, plus the scales (hidden rows stay bf16)."""
    distinct = int(torch.unique(topk_ids).numel())
    return (distinct * 3 * hidden * inter + fp8_scale_bytes(distinct, hidden, inter, block)
            + 2 * topk_ids.shape[0] * hidden * DTYPE_BYTES)


def int4_step_bytes(topk_ids: torch.Tensor, hidden: int, inter: int, group: int, zeros: bool) -> int:
    """step_bytes with half a byte per weight, plus a bf16 scale (and zero) per group of `group` input
    columns of every row: 2I rows of H / group groups for w13, H rows of I / group for w2."""
    distinct = int(torch.unique(topk_ids).numel())
    groups = 2 * inter * (hidden // group) + hidden * (inter // group)
    per_expert = 3 * hidden * inter // 2 + groups * DTYPE_BYTES * (2 if zeros else 1)
    return distinct * per_expert + 2 * topk_ids.shape[0] * hidden * DTYPE_BYTES


ROUTING = Routing.qwen_moe(NUM_EXPERTS, TOP_K, norm_topk_prob=True)
MOE_LAYERS = 48  # Qwen3-30B-A3B's


def make_logits(num_tokens: int, count: int, gen: torch.Generator) -> list[torch.Tensor]:
    """`count` random router logits [num_tokens, E] (float32, on the host); for one token, logits j are
    pushed onto the j-th disjoint set of TOP_K experts of a random permutation (wrapping around after
    128 / 8 sets)."""
    perm = torch.randperm(NUM_EXPERTS, generator=gen)
    out = []
    for j in range(count):
        logits = torch.randn(num_tokens, NUM_EXPERTS, generator=gen)
        if num_tokens == 1:
            chosen = perm.view(-1, TOP_K)[j % (NUM_EXPERTS // TOP_K)]
            logits[:, chosen] += 20.0
        out.append(logits)
    return out


def make_routings(num_tokens: int, count: int, gen: torch.Generator, device: str
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` (topk_weights, topk_ids) of make_logits' logits through Qwen3-MoE routing."""
    out = []
    for logits in make_logits(num_tokens, count, gen):
        weights, ids = ROUTING.select(logits.to(device))
        out.append((weights.to(torch.bfloat16), ids))
    return out


def bench_block(num_tokens: int, w13: torch.Tensor, w2: torch.Tensor, bandwidth: float, gen: torch.Generator
                ) -> dict:
    """The MoE block from its input rows, router GEMV included, routed by torch ops or in the kernels
    (see the module docstring), with PDL on (where supported) and off."""
    x = (torch.randn(num_tokens, HIDDEN, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    router = (torch.randn(NUM_EXPERTS, HIDDEN, generator=gen) / HIDDEN ** 0.5).to(torch.bfloat16).cuda()
    logits = [lg.to(torch.bfloat16).cuda() for lg in make_logits(num_tokens, ROUTINGS, gen)]
    kernel_routing = ROUTING.kernel_routing
    nbytes = (sum(step_bytes(ROUTING.select(lg)[1], HIDDEN, INTER) for lg in logits) / len(logits)
              + router.numel() * DTYPE_BYTES)

    def route(inp: torch.Tensor) -> torch.Tensor:
        return gemv(inp, router) if num_tokens == 1 else torch.nn.functional.linear(inp, router)

    def torch_routing(lg: torch.Tensor) -> torch.Tensor:
        route(x)
        weights, ids = ROUTING.select(lg)
        return fused_moe(x, w13, w2, weights, ids)

    def fused_routing(lg: torch.Tensor) -> torch.Tensor:
        route(x)
        return fused_moe_routed(x, lg, w13, w2, kernel_routing)[0]

    agree = all(torch.equal(ROUTING.select(lg)[1], fused_moe_routed(x, lg, w13, w2, kernel_routing)[2].long())
                for lg in logits)
    err = max((torch_routing(lg).float() - fused_routing(lg).float()).abs().max().item() for lg in logits)
    was = triton_utils.pdl()
    row: dict = {"bytes_mean": int(nbytes), "roofline_us": round(nbytes / bandwidth * 1e6, 2),
                 "same_experts_as_torch_routing": agree, "max_abs_diff_vs_torch_routing": err}
    for pdl in ((True, False) if triton_utils.pdl_supported(x.device) else (False,)):
        triton_utils.set_pdl(pdl)
        times = {name: time_in_graph([(lambda lg=lg, f=f: f(lg)) for lg in logits])
                 for name, f in (("torch_routing", torch_routing), ("fused_routing", fused_routing))}
        row["pdl" if pdl else "no_pdl"] = {
            **{f"{name}_us": round(t * 1e6, 2) for name, t in times.items()},
            **{f"{name}_ratio": round(nbytes / bandwidth / t, 3) for name, t in times.items()},
            "fused_over_torch": round(times["fused_routing"] / times["torch_routing"], 3),
            "saved_ms_per_token_48_layers": round((times["torch_routing"] - times["fused_routing"]) * MOE_LAYERS
                                                  * 1e3, 3)}
    triton_utils.set_pdl(was)
    return row


def time_eager(calls: list, trials: int = 3) -> float:
    """Median seconds per call, run eagerly (host syncs included, as the torch loop needs them)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    samples = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / len(calls))
    return sorted(samples)[len(samples) // 2]


def rank_split_weights(w13: torch.Tensor, w2: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's weights when every expert is split along its intermediate dimension over tp ranks."""
    inter = INTER // tp
    return (torch.cat([w13[:, :inter], w13[:, INTER:INTER + inter]], dim=1).contiguous(),
            w2[:, :, :inter].contiguous())


def rank_shares(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor],
                routings: list[tuple[torch.Tensor, torch.Tensor]], tp: int, bandwidth: float) -> dict:
    """One rank's fused MoE under each layout (see the module docstring), timed in a CUDA graph."""
    io = 2 * x.shape[0] * HIDDEN * DTYPE_BYTES

    def timed(calls: list, nbytes: float) -> dict:
        sec = time_in_graph(calls)
        return {"us": round(sec * 1e6, 2), "bytes_mean": int(nbytes), "ratio": round(nbytes / bandwidth / sec, 3)}

    split_bytes = sum(step_bytes(ids, HIDDEN, INTER // tp) for _, ids in routings) / len(routings)
    row = {"intermediate_split": timed([(lambda w=w, i=i: fused_moe(x, *split, w, i)) for w, i in routings],
                                       split_bytes)}
    per = NUM_EXPERTS // tp
    ranks = []
    for r in range(tp):
        shard = (w13[r * per:(r + 1) * per], w2[r * per:(r + 1) * per])
        held = [int(((ids >= r * per) & (ids < (r + 1) * per)).any(dim=1).sum()) for _, ids in routings]
        nbytes = sum(int(torch.unique(ids[(ids >= r * per) & (ids < (r + 1) * per)]).numel()) * 3 * HIDDEN * INTER
                     * DTYPE_BYTES for _, ids in routings) / len(routings) + io
        calls = [(lambda w=w, i=i, s=shard, start=r * per: fused_moe(x, *s, w, i, expert_start=start,
                                                                      num_global_experts=NUM_EXPERTS))
                 for w, i in routings]
        ranks.append({"rank": r, "tokens_with_a_held_expert_mean": sum(held) / len(held), **timed(calls, nbytes)})
    slowest = max(ranks, key=lambda d: d["us"])
    row["expert_parallel"] = {"ranks": ranks, "slowest_rank_us": slowest["us"]}
    row["expert_parallel_over_split"] = round(slowest["us"] / row["intermediate_split"]["us"], 3)
    return row


def bench_quantized(x: torch.Tensor, experts: tuple, routings: list[tuple[torch.Tensor, torch.Tensor]],
                    bandwidth: float, bf16_us: float, nbytes: float, name: str) -> dict:
    """Quantized experts' timings beside the bf16 ones of the same batch and routings (see the docstring):
    experts = (w13, w2, scales) as fused_moe takes them, nbytes what a step must read, name the ratio's."""
    q13, q2, scales = experts
    num_tokens = x.shape[0]
    roofline = nbytes / bandwidth

    def timed(config: FusedMoeConfig) -> dict:
        sec = time_in_graph([(lambda w=w, i=i: fused_moe(x, q13, q2, w, i, config, scales=scales))
                             for w, i in routings])
        return {"us": round(sec * 1e6, 2), "ratio": round(roofline / sec, 3)}

    default = default_moe_config(num_tokens, TOP_K, NUM_EXPERTS)
    weights, ids = routings[0]
    expected = torch_loop_moe(x.float(), q13, q2, weights.float(), ids, scales=scales)
    err = (fused_moe(x, q13, q2, weights, ids, scales=scales).float() - expected).abs().max().item()
    fused = timed(default)
    row = {"bytes_mean": int(nbytes), "roofline_us": round(roofline * 1e6, 2), "fused_us": fused["us"],
           "fused_ratio": fused["ratio"], f"{name}_over_bf16": round(fused["us"] / bf16_us, 3), "max_abs_err": err}
    if num_tokens <= PATH_SPLIT_MAX:
        row["gemv_path"] = timed(FusedMoeConfig(small_batch_max_tokens=num_tokens, gemm=default.gemm))
        row["grouped_path"] = timed(FusedMoeConfig(small_batch_max_tokens=0, gemm=default.gemm))
    return row


def bench_fp8(x: torch.Tensor, fp8: tuple, routings: list[tuple[torch.Tensor, torch.Tensor]], bandwidth: float,
              bf16_us: float) -> dict:
    block = fp8[2].block
    nbytes = sum(fp8_step_bytes(ids, HIDDEN, INTER, block) for _, ids in routings) / len(routings)
    return {"scales": "block" if block else "channel",
            **bench_quantized(x, fp8, routings, bandwidth, bf16_us, nbytes, "fp8")}


def bench_int4(x: torch.Tensor, int4: tuple, routings: list[tuple[torch.Tensor, torch.Tensor]], bandwidth: float,
               bf16_us: float) -> dict:
    zeros = int4[2].w13_zeros is not None
    nbytes = sum(int4_step_bytes(ids, HIDDEN, INTER, INT4_GROUP, zeros) for _, ids in routings) / len(routings)
    return {"group_size": INT4_GROUP, "zero_points": zeros,
            **bench_quantized(x, int4, routings, bandwidth, bf16_us, nbytes, "int4")}


def bench_batch(num_tokens: int, w13: torch.Tensor, w2: torch.Tensor, weights_fp32: tuple[torch.Tensor, torch.Tensor],
                bandwidth: float, quick: bool, gen: torch.Generator, tp: int = 1,
                split: tuple[torch.Tensor, torch.Tensor] | None = None, fp8: tuple | None = None,
                int4: tuple | None = None) -> dict:
    """One batch size: timings, roofline ratios and the max error against the torch loop in float32."""
    x = (torch.randn(num_tokens, HIDDEN, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    routings = make_routings(num_tokens, ROUTINGS, gen, "cuda")
    nbytes = sum(step_bytes(ids, HIDDEN, INTER) for _, ids in routings) / len(routings)
    roofline = nbytes / bandwidth

    def timed(config: FusedMoeConfig) -> dict:
        sec = time_in_graph([(lambda w=w, i=i: fused_moe(x, w13, w2, w, i, config)) for w, i in routings])
        return {"us": round(sec * 1e6, 2), "ratio": round(roofline / sec, 3)}

    default = default_moe_config(num_tokens, TOP_K, NUM_EXPERTS)
    weights, ids = routings[0]
    expected = torch_loop_moe(x.float(), *weights_fp32, weights.float(), ids)
    err = (fused_moe(x, w13, w2, weights, ids).float() - expected).abs().max().item()
    fused = timed(default)
    eager = time_eager([(lambda w=w, i=i: fused_moe(x, w13, w2, w, i, default)) for w, i in routings])
    loop = time_eager([(lambda w=w, i=i: torch_loop_moe(x, w13, w2, w, i)) for w, i in routings])
    row = {"batch": num_tokens,
           "distinct_experts_mean": sum(int(torch.unique(i).numel()) for _, i in routings) / len(routings),
           "expected_distinct_experts": round(expected_distinct_experts(NUM_EXPERTS, TOP_K, num_tokens), 2),
           "bytes_mean": int(nbytes), "roofline_us": round(roofline * 1e6, 2),
           "default_config": asdict(default), "fused_us": fused["us"], "fused_ratio": fused["ratio"],
           "fused_eager_us": round(eager * 1e6, 2), "torch_loop_us": round(loop * 1e6, 2),
           "speedup_vs_torch_loop": round(loop * 1e6 / fused["us"], 2), "max_abs_err": err}
    if num_tokens <= PATH_SPLIT_MAX:
        row["gemv_path"] = timed(FusedMoeConfig(small_batch_max_tokens=num_tokens, gemm=default.gemm))
        row["grouped_path"] = timed(FusedMoeConfig(small_batch_max_tokens=0, gemm=default.gemm))
        row["gemv_block_n"] = {bn: timed(FusedMoeConfig(small_batch_max_tokens=num_tokens, gemv_block_n=bn))
                               for bn in (1, 4, 8)} if not quick else {}
        row["block"] = bench_block(num_tokens, w13, w2, bandwidth, gen)
    if not quick:
        sweep = [{**asdict(c), **timed(FusedMoeConfig(small_batch_max_tokens=0, gemm=c))} for c in SWEEP]
        row["sweep"] = sweep
        row["best_grouped"] = max(sweep, key=lambda s: s["ratio"])
    if tp > 1 and split is not None:
        row["rank_share"] = rank_shares(x, w13, w2, split, routings, tp, bandwidth)
    if fp8 is not None:
        row["fp8"] = bench_fp8(x, fp8, routings, bandwidth, fused["us"])
    if int4 is not None:
        row["int4"] = bench_int4(x, int4, routings, bandwidth, fused["us"])
    progress({k: v for k, v in row.items() if k != "sweep"})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--batches", default="1,2,4,8,16,64,256",
                    help="comma-separated token counts (the issue's: 1, 64, 256)")
    ap.add_argument("--quick", action="store_true", help="the default configs only")
    ap.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                    help="also time one rank's share under the intermediate split and under expert parallelism")
    ap.add_argument("--fp8", choices=["block", "channel"],
                    help="also time the experts in FP8 (e4m3) with 128x128 block or per-channel scales")
    ap.add_argument("--int4", choices=["awq", "gptq"],
                    help="also time the experts in 4 bits, group 128: AWQ (zero points) or symmetric GPTQ")
    args = ap.parse_args()
    tp = args.tensor_parallel_size
    if tp < 1 or NUM_EXPERTS % tp or INTER % tp:
        raise SystemExit(f"--tensor-parallel-size must divide num_experts={NUM_EXPERTS} and the intermediate "
                         f"size {INTER}, got {tp}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe.py needs a CUDA GPU")
    bandwidth = measure_copy_bandwidth()
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, device="cuda") / HIDDEN ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(NUM_EXPERTS, HIDDEN, INTER, device="cuda") / INTER ** 0.5).to(torch.bfloat16)
    weights_fp32 = (w13.float(), w2.float())  # the error reference: the torch loop on upcast weights
    split = rank_split_weights(w13, w2, tp) if tp > 1 else None
    fp8 = quantize_fp8_experts(w13, w2, args.fp8 == "block") if args.fp8 else None
    int4 = quantize_int4_experts(w13, w2, INT4_GROUP, symmetric=args.int4 == "gptq") if args.int4 else None
    cases = [bench_batch(int(b), w13, w2, weights_fp32, bandwidth, args.quick, gen, tp, split, fp8, int4)
             for b in args.batches.split(",")]
    emit({"benchmark": "moe/fused-vs-torch-loop", "device": torch.cuda.get_device_name(),
          "torch": torch.__version__, "triton": triton.__version__, "copy_gb_per_s": round(bandwidth / 1e9, 1),
          "shape": {"hidden": HIDDEN, "experts": NUM_EXPERTS, "top_k": TOP_K, "moe_intermediate": INTER,
                    "dtype": "bfloat16"}, "tensor_parallel_size": tp, "fp8": args.fp8, "int4": args.int4,
          "cases": cases}, args.out)


if __name__ == "__main__":
    main()
