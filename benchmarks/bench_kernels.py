"""Kernel benchmark: decode attention bandwidth against measured copy bandwidth, plus prefill attention
and the elementwise kernels against torch eager and torch.compile. Prints one JSON object (progress
on stderr).

    python benchmarks/bench_kernels.py --out results.json [--quick]

How it measures:
- Copy bandwidth B: common.measure_copy_bandwidth, as in every other benchmark (a device-to-device copy,
  bytes read + written, median of several runs).
- Kernels are timed inside a CUDA graph (as decode runs in the engine), so host launch cost does not
  hide GPU time. Each graph cycles through several independent input sets holding >= 512 MiB in
  all, so repeated calls do not read from L2 what a real step would read from HBM.
- Decode attention (Qwen3-0.6B attention: 16 q heads, 8 KV heads, head_dim 128, bf16, page 16,
  pages of each request scattered over the cache): bytes = K and V of every context token + q + out.
  Each case runs the default split count (the table in carpool/ops/triton/attention.py) and a sweep
  of split counts and tile configs, reporting the best, so the table can be tuned from one run.
- Mixed contexts (uniform in [100, 1100] and [100, 2048]): the default launch (the table's split count,
  requests in batch order, every request split alike) and the balanced one the engine uses
  (attention.balanced_decode_plan: longest first, a split count per request), side by side on the same
  data, each with its sweep (grid splits x target work items x order for the balanced one), so the
  constants of attention.py can be tuned from one run.
- FP8 cache (`--parts fp8`, not in the default parts): the same mixed contexts over an e4m3 cache
  against the bf16 cache, each with the engine's launch, and a sweep of FP8 tile configs and plans.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import torch
import triton

from common import emit, measure_copy_bandwidth

from carpool.forward_batch import AttentionMetadata
from carpool.ops import torch_ref
from carpool.ops import triton as tri
from carpool.ops.triton.attention import DECODE_TARGET_ITEMS, DecodePlan, balanced_decode_plan, decode_num_splits
from carpool.ops.triton.decode_attention import DecodeConfig, decode_attention, decode_scratch, default_decode_config
from carpool.utils import cdiv

HQ, HKV, HEAD_DIM, PAGE = 16, 8, 128, 16
DTYPE = torch.bfloat16
DEVICE = "cuda"
ROTATE_BYTES = 512 << 20  # each timed graph touches at least this much distinct memory
MAX_SETS = 64


def progress(row: dict) -> None:
    """Partial results go to stderr; stdout carries only the final JSON object."""
    print(json.dumps(row), file=sys.stderr, flush=True)


def time_in_graph(calls: list[Callable[[], object]], trials: int = 3, min_ms: float = 25.0) -> float:
    """Median seconds per call, each graph replay running all `calls` once in order."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm up: compile, autotune caches, allocator
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    replays = max(1, int(min_ms / max(start.elapsed_time(end), 1e-3)))
    samples = []
    for _ in range(trials):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / (replays * len(calls)))
    return statistics.median(samples)


def num_sets(bytes_per_call: int) -> int:
    return max(1, min(MAX_SETS, cdiv(ROTATE_BYTES, max(bytes_per_call, 1))))


# ---- decode attention --------------------------------------------------------------------------

def decode_inputs(batch: int, context: int | list[int], sets: int, gen: torch.Generator,
                  cache_dtype: torch.dtype = DTYPE) -> dict:
    """One cache holding `sets` disjoint copies of the batch's pages, each set with its own table.
    `context`: one length for every request, or one per request. `cache_dtype`: DTYPE or e4m3 (FP8)."""
    lens = context if isinstance(context, list) else [context] * batch
    blocks_per_req = cdiv(max(lens), PAGE)
    total = batch * blocks_per_req * sets
    k_cache = torch.empty(total, PAGE, HKV, HEAD_DIM, dtype=DTYPE, device=DEVICE).normal_().to(cache_dtype)
    v_cache = torch.empty(total, PAGE, HKV, HEAD_DIM, dtype=DTYPE, device=DEVICE).normal_().to(cache_dtype)
    perm = torch.randperm(total, generator=gen).to(torch.int32).view(sets, batch, blocks_per_req).to(DEVICE)
    q = torch.randn(batch, HQ, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    return dict(k_cache=k_cache, v_cache=v_cache, tables=list(perm.unbind(0)), q=q,
                out=torch.empty_like(q),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
                qsl=torch.arange(batch + 1, dtype=torch.int32, device=DEVICE))


def bench_decode_mixed(bandwidth: float, batch: int, lo: int, hi: int) -> dict:
    """Decode over contexts drawn uniformly from [lo, hi], as in the offline throughput workload (prompts
    of 100-1024 tokens): unequal programs, so load balance matters as much as the per-tile rate. The
    default launch with a sweep of split counts and tile configs; the balanced launch with a sweep of its
    plan's constants (grid splits, target work items; ordered or in batch order), default tile config."""
    rng = torch.Generator().manual_seed(1)
    lens = torch.randint(lo, hi + 1, (batch,), generator=rng).tolist()
    nbytes = 2 * sum(lens) * HKV * HEAD_DIM * 2 + 2 * batch * HQ * HEAD_DIM * 2
    inp = decode_inputs(batch, lens, num_sets(nbytes), torch.Generator().manual_seed(0))
    configs = [DecodeConfig(block_n=b, num_warps=w, num_stages=st) for b, w, st in
               ((64, 4, 2), (64, 4, 3), (64, 4, 4), (32, 4, 2), (32, 4, 3), (128, 4, 2), (128, 8, 2),
                (128, 8, 3), (64, 8, 3))]
    default_splits = decode_num_splits(batch, HKV)
    split_choices = sorted({1, 2, 4, default_splits})

    def row(sec: float, **fields: object) -> dict:
        return dict(**fields, us=round(sec * 1e6, 2), roofline_ratio=round(nbytes / sec / bandwidth, 3))

    sweep = []
    for config in configs:
        for splits in split_choices:
            sweep.append(row(time_decode(inp, splits, config), num_splits=splits, block_n=config.block_n,
                             num_warps=config.num_warps, num_stages=config.num_stages))
    default = next(s for s in sweep if s["num_splits"] == default_splits)  # configs[0] is the default
    plan = balanced_decode_plan(lens, HKV)
    balanced_sweep = []
    for splits in sorted({1, 2, 4, 8, plan.num_splits}):
        for target in sorted({DECODE_TARGET_ITEMS // 4, DECODE_TARGET_ITEMS // 2, DECODE_TARGET_ITEMS,
                              2 * DECODE_TARGET_ITEMS}):
            p = balanced_decode_plan(lens, HKV, splits, target_items=target)
            # Batch order too at the default target: how much of the gain the order alone brings.
            for ordered in ((True, False) if target == DECODE_TARGET_ITEMS else (True,)):
                balanced_sweep.append(row(time_decode(inp, splits, configs[0], p, ordered), num_splits=splits,
                                          target_items=target, ordered=ordered, split_len=p.split_len,
                                          work_items=work_items(lens, p, configs[0].block_n)))
    balanced = next(s for s in balanced_sweep if s["num_splits"] == plan.num_splits and s["ordered"]
                    and s["target_items"] == DECODE_TARGET_ITEMS)
    result = dict(batch=batch, contexts=[lo, hi], bytes=nbytes, default=default, balanced=balanced,
                  best=max(sweep, key=lambda s: s["roofline_ratio"]),
                  best_balanced=max(balanced_sweep, key=lambda s: s["roofline_ratio"]),
                  sweep=sweep, balanced_sweep=balanced_sweep)
    progress({k: v for k, v in result.items() if not k.endswith("sweep")})
    del inp
    torch.cuda.empty_cache()
    return result


def bench_decode_fp8(bandwidth: float, batch: int, lo: int, hi: int) -> dict:
    """Decode over an FP8 (e4m3) cache against the bf16 cache on the same contexts (uniform in [lo, hi]),
    both with the engine's launch (default tile config, balanced plan): `speedup` = bf16 us / fp8 us, the
    gain `--kv-cache-dtype fp8` can bring to the attention share of a decode step (at most 2: half the
    bytes). Each ratio is against copy bandwidth over that cache's own bytes. The FP8 sweep covers tile
    configs (the default, FP8_DECODE_CONFIG, the model-dtype default's 64-key tile, and the default with
    the other e4m3 conversion) and the plan's target work items, so the FP8 defaults can be tuned from
    one run."""
    rng = torch.Generator().manual_seed(1)
    lens = torch.randint(lo, hi + 1, (batch,), generator=rng).tolist()
    plan = balanced_decode_plan(lens, HKV)

    def nbytes(elem: int) -> int:
        return 2 * sum(lens) * HKV * HEAD_DIM * elem + 2 * batch * HQ * HEAD_DIM * 2

    def row(sec: float, elem: int, **fields: object) -> dict:
        return dict(**fields, us=round(sec * 1e6, 2), roofline_ratio=round(nbytes(elem) / sec / bandwidth, 3))

    inp = decode_inputs(batch, lens, num_sets(nbytes(2)), torch.Generator().manual_seed(0))
    bf16 = row(time_decode(inp, plan.num_splits, default_decode_config(HEAD_DIM, DTYPE), plan), 2)
    del inp
    inp = decode_inputs(batch, lens, num_sets(nbytes(1)), torch.Generator().manual_seed(0), torch.float8_e4m3fn)
    default_config = default_decode_config(HEAD_DIM, DTYPE, kv_fp8=True)
    configs = [default_config] + [c for c in (DecodeConfig(64, 8, 2), DecodeConfig(64, 4, 2), DecodeConfig(128, 4, 2),
                                              DecodeConfig(128, 8, 3), DecodeConfig(256, 8, 2),
                                              replace(default_config, e4m3_pairs=not default_config.e4m3_pairs))
                                  if c != default_config]
    sweep = []
    for config in configs:
        for target in (DECODE_TARGET_ITEMS // 2, DECODE_TARGET_ITEMS, 2 * DECODE_TARGET_ITEMS):
            p = balanced_decode_plan(lens, HKV, target_items=target)
            sweep.append(row(time_decode(inp, p.num_splits, config, p), 1, block_n=config.block_n,
                             num_warps=config.num_warps, num_stages=config.num_stages,
                             e4m3_pairs=config.e4m3_pairs, target_items=target,
                             num_splits=p.num_splits, split_len=p.split_len))
    fp8 = next(r for r in sweep if r["target_items"] == DECODE_TARGET_ITEMS)  # configs[0]: the engine's launch
    best = min(sweep, key=lambda r: r["us"])
    result = dict(batch=batch, contexts=[lo, hi], bf16=bf16, fp8=fp8, speedup=round(bf16["us"] / fp8["us"], 3),
                  best_fp8=best, best_speedup=round(bf16["us"] / best["us"], 3), fp8_sweep=sweep)
    progress({k: v for k, v in result.items() if k != "fp8_sweep"})
    del inp
    torch.cuda.empty_cache()
    return result


def work_items(lens: list[int], plan: DecodePlan, block_n: int) -> int:
    """Programs of a balanced launch that do work: used splits x KV heads (as the kernel counts them)."""
    split_tiles = triton.cdiv(plan.split_len, block_n)
    return HKV * sum(min(plan.num_splits, max(1, triton.cdiv(triton.cdiv(n, block_n), split_tiles))) for n in lens)


def time_decode(inp: dict, num_splits: int, config: DecodeConfig, plan: DecodePlan | None = None,
                ordered: bool = True) -> float:
    """Without a plan: the default launch; with one: balanced (in batch order unless `ordered`)."""
    batch = inp["q"].shape[0]
    scratch = decode_scratch(batch, HQ, num_splits, HEAD_DIM, DEVICE)
    order = torch.from_numpy(plan.order).to(DEVICE) if plan is not None and ordered else None
    split_len = (torch.tensor([plan.split_len], dtype=torch.int32, device=DEVICE) if plan is not None
                 else None)
    calls = [(lambda t=t: decode_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["out"], t,
                                           inp["seq_lens"], inp["qsl"], HEAD_DIM ** -0.5, num_splits,
                                           config, scratch, order=order, split_len=split_len))
             for t in inp["tables"]]
    return time_in_graph(calls)


def time_decode_op(inp: dict) -> float:
    """The whole paged_attention op (KV store + decode + merge) with its default split count."""
    batch, context = inp["q"].shape[0], int(inp["seq_lens"][0])  # one length for all
    kv_new = torch.randn(batch, HKV, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    calls = []
    for t in inp["tables"]:
        slots = (t[:, (context - 1) // PAGE].long() * PAGE + (context - 1) % PAGE).contiguous()
        meta = AttentionMetadata(inp["qsl"], inp["seq_lens"], t, slots, max_query_len=1, max_seq_len=context,
                                 query_start_loc_cpu=list(range(batch + 1)), seq_lens_cpu=[context] * batch)
        calls.append(lambda meta=meta: tri.paged_attention(inp["q"], kv_new, kv_new, inp["k_cache"],
                                                           inp["v_cache"], meta, HEAD_DIM ** -0.5))
    return time_in_graph(calls)


def bench_decode(bandwidth: float, batches: list[int], contexts: list[int], quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    default_config = default_decode_config(HEAD_DIM, DTYPE)
    others = [DecodeConfig(block_n=64, num_stages=3), DecodeConfig(block_n=32, num_stages=2),
              DecodeConfig(block_n=128, num_stages=2), DecodeConfig(block_n=128, num_warps=8, num_stages=2)]
    configs = [default_config] + ([] if quick else [c for c in others if c != default_config])
    split_choices = [1, 2, 4, 8, 16, 32]
    results = []
    for batch in batches:
        for context in contexts:
            kv_bytes = 2 * batch * context * HKV * HEAD_DIM * 2
            nbytes = kv_bytes + 2 * batch * HQ * HEAD_DIM * 2
            inp = decode_inputs(batch, context, num_sets(nbytes), gen)
            default_splits = decode_num_splits(batch, HKV, context)
            sweep: list[dict] = []
            for config in configs:
                for splits in sorted({default_splits, *split_choices}):
                    if splits > 1 and context // splits < config.block_n:
                        continue
                    near_default = splits in (1, default_splits, 2 * default_splits, default_splits // 2)
                    if quick and not near_default:
                        continue
                    sec = time_decode(inp, splits, config)
                    sweep.append(dict(num_splits=splits, block_n=config.block_n, num_warps=config.num_warps,
                                      num_stages=config.num_stages,
                                      us=round(sec * 1e6, 2), gb_per_s=round(nbytes / sec / 1e9, 1),
                                      roofline_ratio=round(nbytes / sec / bandwidth, 3)))
            default = sweep[[s["num_splits"] for s in sweep].index(default_splits)]  # configs[0] runs first
            best = max(sweep, key=lambda s: s["gb_per_s"])
            # The balanced launch the engine uses, on equal contexts: what its splits cost where the
            # default is already balanced.
            plan = balanced_decode_plan([context] * batch, HKV)
            sec = time_decode(inp, plan.num_splits, default_config, plan)
            balanced = dict(num_splits=plan.num_splits, split_len=plan.split_len, us=round(sec * 1e6, 2),
                            roofline_ratio=round(nbytes / sec / bandwidth, 3))
            op_sec = time_decode_op(inp)
            results.append(dict(batch=batch, context=context, bytes=nbytes, num_splits=default_splits,
                                gb_per_s=default["gb_per_s"], roofline_ratio=default["roofline_ratio"],
                                us=default["us"], balanced=balanced, op_us_with_kv_store=round(op_sec * 1e6, 2),
                                best=best, sweep=sweep))
            progress({k: v for k, v in results[-1].items() if k != "sweep"})
            del inp
            torch.cuda.empty_cache()
    return results


# ---- prefill attention -------------------------------------------------------------------------

def bench_prefill(reqs: list[tuple[int, int]]) -> dict:
    """reqs: (seq_len, q_len). TFLOP/s of the Triton kernel; SDPA (flash) alongside when no prefix."""
    gen = torch.Generator().manual_seed(1)
    blocks = [cdiv(s, PAGE) for s, _ in reqs]
    perm = torch.randperm(sum(blocks), generator=gen).tolist()
    table = torch.zeros(len(reqs), max(blocks), dtype=torch.int32)
    slots, qsl = [], [0]
    for i, ((seq_len, q_len), nb) in enumerate(zip(reqs, blocks)):
        row = [perm.pop() for _ in range(nb)]
        table[i, :nb] = torch.tensor(row, dtype=torch.int32)
        slots += [row[p // PAGE] * PAGE + p % PAGE for p in range(seq_len - q_len, seq_len)]
        qsl.append(qsl[-1] + q_len)
    n = qsl[-1]
    k_cache = torch.randn(sum(blocks), PAGE, HKV, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(n, HQ, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    k, v = torch.randn(n, HKV, HEAD_DIM, dtype=DTYPE, device=DEVICE), torch.randn(n, HKV, HEAD_DIM,
                                                                                   dtype=DTYPE, device=DEVICE)
    seq_lens = [s for s, _ in reqs]
    meta = AttentionMetadata(torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
                             torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), table.to(DEVICE),
                             torch.tensor(slots, dtype=torch.int64, device=DEVICE),
                             max_query_len=max(q for _, q in reqs), max_seq_len=max(seq_lens),
                             query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    # Causal work: query j of a request sees (seq_len - q_len + j + 1) keys; QK^T and PV: 4 flops each.
    flops = sum(4 * HQ * HEAD_DIM * sum(s - ql + j + 1 for j in range(ql)) for s, ql in reqs)
    sec = triton.testing.do_bench(lambda: tri.paged_attention(q, k, v, k_cache, v_cache, meta,
                                                              HEAD_DIM ** -0.5),
                                  warmup=25, rep=200, return_mode="median") * 1e-3
    groups = Counter(reqs)
    label = " + ".join(f"{n} x (seq_len {s}, q_len {ql})" for (s, ql), n in groups.items())
    result = dict(reqs=label, tflop_per_s=round(flops / sec / 1e12, 1), ms=round(sec * 1e3, 3))
    if all(s == ql == reqs[0][0] for s, ql in reqs):
        qb = q.view(len(reqs), -1, HQ, HEAD_DIM).transpose(1, 2)
        kb = k.view(len(reqs), -1, HKV, HEAD_DIM).transpose(1, 2)
        vb = v.view(len(reqs), -1, HKV, HEAD_DIM).transpose(1, 2)
        sdpa = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, is_causal=True, enable_gqa=True), warmup=25, rep=200, return_mode="median") * 1e-3
        result["sdpa_tflop_per_s"] = round(flops / sdpa / 1e12, 1)
    return result


# ---- elementwise ------------------------------------------------------------------------------

def bench_elementwise(tokens: int) -> list[dict]:
    cases: list[tuple[str, Callable[[], tuple], Callable, int]] = []
    for hidden in (1024, 4096):
        def norm_args(h: int = hidden) -> tuple:
            return (torch.randn(tokens, h, dtype=DTYPE, device=DEVICE), torch.randn(tokens, h, dtype=DTYPE,
                    device=DEVICE), torch.randn(h, dtype=DTYPE, device=DEVICE), 1e-6)
        cases.append((f"fused_add_rms_norm[{tokens}x{hidden}]", norm_args, "fused_add_rms_norm",
                      tokens * hidden * 2 * 4))
    cases.append((f"silu_and_mul[{tokens}x2x3072]", lambda: (torch.randn(tokens, 6144, dtype=DTYPE,
                  device=DEVICE),), "silu_and_mul", tokens * 3072 * 2 * 3))
    angles = torch.rand(40960, HEAD_DIM // 2, device=DEVICE) * 6.3  # a real rotation: applied in place
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)  # many times, values must stay bounded
    pages = cdiv(tokens, PAGE)

    def rope_args() -> tuple:
        q, k, v = (torch.randn(tokens, h, HEAD_DIM, dtype=DTYPE, device=DEVICE) for h in (HQ, HKV, HKV))
        caches = [torch.empty(pages, PAGE, HKV, HEAD_DIM, dtype=DTYPE, device=DEVICE) for _ in range(2)]
        return (torch.randint(0, 40960, (tokens,), device=DEVICE), q, k, v, cos_sin, *caches,
                torch.randperm(pages * PAGE, device=DEVICE)[:tokens])
    # q read and written in place; k and v read, written to the cache
    cases.append((f"rope_and_store_kv[{tokens}x(16+8+8)x128]", rope_args, "rope_and_store_kv",
                  tokens * (HQ + 2 * HKV) * HEAD_DIM * 2 * 2 + tokens * HEAD_DIM * 4))
    cases.append((f"rms_norm_per_head[{tokens}x16x128]", lambda: (
        torch.randn(tokens, HQ, HEAD_DIM, dtype=DTYPE, device=DEVICE), torch.randn(HEAD_DIM, dtype=DTYPE,
        device=DEVICE), 1e-6), "rms_norm", tokens * HQ * HEAD_DIM * 2 * 2))
    results = []
    for label, make_args, name, nbytes in cases:
        arg_sets = [make_args() for _ in range(num_sets(nbytes))]
        row: dict = dict(case=label, bytes=nbytes)
        impls = {"triton": getattr(tri, name), "eager": getattr(torch_ref, name)}
        try:
            impls["compile"] = torch.compile(getattr(torch_ref, name), dynamic=False)
        except Exception as e:  # noqa: BLE001 -- report, don't fail the whole benchmark
            row["compile_error"] = repr(e)[:200]
        for impl_name, fn in impls.items():
            try:
                sec = time_in_graph([lambda a=a, fn=fn: fn(*a) for a in arg_sets])
                row[f"{impl_name}_gb_per_s"] = round(nbytes / sec / 1e9, 1)
                row[f"{impl_name}_us"] = round(sec * 1e6, 2)
            except Exception as e:  # noqa: BLE001
                row[f"{impl_name}_error"] = repr(e)[:200]
        results.append(row)
        progress(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="one tile config, fewer split counts")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--contexts", default="1024,2048,4096,8192")
    parser.add_argument("--parts", default="decode,mixed,prefill,elementwise",
                        help="comma-separated subset; 'fp8': decode over an FP8 cache against bf16")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    bandwidth = measure_copy_bandwidth()
    progress({"copy_gb_per_s": round(bandwidth / 1e9, 1)})
    decode = bench_decode(bandwidth, [int(b) for b in args.batches.split(",")],
                          [int(c) for c in args.contexts.split(",")], args.quick) if "decode" in parts else []
    mixed = [bench_decode_mixed(bandwidth, b, 100, hi) for hi in (1100, 2048) for b in (16, 64, 128, 256)
             ] if "mixed" in parts else []
    fp8 = [bench_decode_fp8(bandwidth, b, 100, hi) for hi in (1100, 2048) for b in (16, 64, 256)
           ] if "fp8" in parts else []
    big = [d["roofline_ratio"] for d in decode if d["batch"] >= 64]
    best_splits: dict[str, dict[str, int]] = {}
    for d in decode:
        best_splits.setdefault(str(d["batch"]), {})[str(d["context"])] = d["best"]["num_splits"]
    prefill = [bench_prefill([(1024, 1024)] * 16), bench_prefill([(4096, 512)] * 4),
               bench_prefill([(300, 300)] * 16 + [(2000, 1)] * 64)] if "prefill" in parts else []
    elementwise = bench_elementwise(256) + bench_elementwise(8192) if "elementwise" in parts else []
    report = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        copy_gb_per_s=round(bandwidth / 1e9, 1),
        # The target: decode attention >= 80% of copy bandwidth at batch >= 64 (worst case here).
        roofline_ratio=min(big) if big else None,
        decode_attention=decode, decode_attention_mixed_contexts=mixed, best_num_splits=best_splits,
        # default vs balanced launch on mixed contexts, ratios to copy bandwidth (details in the list above)
        decode_mixed_summary=[dict(batch=m["batch"], contexts=m["contexts"],
                                   default=m["default"]["roofline_ratio"], balanced=m["balanced"]["roofline_ratio"],
                                   best_balanced=m["best_balanced"]["roofline_ratio"]) for m in mixed],
        prefill_attention=prefill,
        # FP8 cache against bf16 (engine launch each; details and the FP8 config sweep in the list)
        decode_fp8_summary=[dict(batch=f["batch"], contexts=f["contexts"], speedup=f["speedup"],
                                 best_speedup=f["best_speedup"], fp8=f["fp8"]["roofline_ratio"],
                                 bf16=f["bf16"]["roofline_ratio"]) for f in fp8],
        decode_attention_fp8=fp8,
        elementwise=elementwise)
    emit(report, args.out)


if __name__ == "__main__":
    main()
