"""Batch-1 decode latency: ms per output token against the bandwidth limit ((weight bytes + K/V bytes of
the mean context) / B, B measured in the same run; a mixture of experts counts the top_k experts a token
reads, not all), with HF transformers `generate` side by side.

Default: the Llama-3-8B shape with random bf16 weights (--load-format dummy: no 16 GB checkpoint on
disk), a 128-token prompt and 256 generated tokens. Prints one JSON object (and writes it to --out).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    LINEAR_BYTES,
    SHAPES,
    ModelArithmetic,
    add_engine_flags,
    device_name,
    emit,
    engine_flags,
    measure_copy_bandwidth,
    write_config,
)


def run_carpool(model: str, prompt: list[int], new_tokens: int, repeats: int,
                engine_kwargs: dict[str, Any], profile: bool = False, breakdown: bool = False) -> dict[str, Any]:
    from carpool import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)  # warm-up
    from profile_util import JitCompiles

    per_token, ttft = [], []
    with JitCompiles(counted=engine_kwargs.get("tensor_parallel_size", 1) == 1) as compiles:
        for _ in range(repeats):
            llm.reset_prefix_cache()
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            m = out.metrics
            assert len(out.outputs[0].token_ids) == new_tokens
            per_token.append((m.finished_time - m.first_token_time) / (new_tokens - 1))
            ttft.append(m.time_to_first_token)
    result: dict[str, Any] = {}
    if hasattr(llm.engine.core.executor, "describe"):  # TP: which all-reduce paths the ranks agreed on
        result["tp_paths"] = llm.engine.core.executor.describe()
    result |= {"ms_per_token": 1e3 * statistics.median(per_token), "ttft_ms": 1e3 * statistics.median(ttft),
               "repeats": repeats, "ms_per_token_each": [round(1e3 * t, 4) for t in per_token],
               "jit_compiles_in_run": compiles.summary()}
    if breakdown:  # one more run with per-step timings (a little slower: events around every step)
        from profile_util import step_breakdown

        llm.reset_prefix_cache()
        result["breakdown"] = step_breakdown(llm.engine, prompt, params)
    if profile:
        from profile_util import profile_steps

        engine = llm.engine
        engine.add_request(None, {"prompt_token_ids": prompt}, params)
        for _ in range(8):  # past the prefill
            engine.step()
        result["profile"] = profile_steps(engine, 50)
        while engine.has_unfinished_requests():
            engine.step()
    llm.engine.shutdown()
    del llm
    import torch

    torch.cuda.empty_cache()
    return result


def run_hf(model: str, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt], device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(4)  # warm-up
    full, one = timed(new_tokens), timed(1)
    return {"ms_per_token": 1e3 * (full - one) / (new_tokens - 1), "seconds_total": full}


def roofline(args: argparse.Namespace, bandwidth: float, linear_bytes: float, kv_dtype_bytes: int) -> dict[str, float]:
    """Bytes one decode token reads at the measured copy bandwidth: the weights (quantized linear layers
    at their own bytes; routers, embedding and LM head in bf16; a mixture of experts' top_k experts, not
    all) and the K/V of the mean context (under 1% of the bytes at these lengths)."""
    arithmetic = ModelArithmetic.of(args.shape, linear_bytes, kv_dtype_bytes)
    weight_bytes = arithmetic.decode_weight_bytes(1)
    kv_bytes = arithmetic.kv_bytes_per_token * (args.prompt_len + args.new_tokens / 2)
    # with TP each GPU reads its share of the weights, in parallel, at its own bandwidth
    ms = 1e3 * (weight_bytes + kv_bytes) / (bandwidth * args.tensor_parallel_size)
    return {"ms_per_token": ms, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--model", default=None, help="checkpoint dir (default: random weights of --shape)")
    ap.add_argument("--checkpoint-dir", default="/tmp/carpool-bench")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    add_engine_flags(ap)
    ap.add_argument("--breakdown", action="store_true",
                    help="add per-step host/device timings (always on with -tp > 1); see profile_util.stop_timings")
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--peer-bf16", action="store_true",
                    help="with --quant-format, --quantization or --kv-cache-dtype fp8: also time bf16 weights and "
                         "a bf16 KV cache in the same run, and report the ratio")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler summary of 50 decode steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.peer_bf16 and not (args.quant_format or args.quantization or args.kv_cache_dtype == "fp8"):
        ap.error("--peer-bf16 compares a quantized run with bf16: pass --quant-format, --quantization or "
                 "--kv-cache-dtype fp8 too")
    if args.peer_bf16 and args.model is not None:
        ap.error("--peer-bf16 needs random weights of --shape (no --model): the bf16 peer is that shape")

    random.seed(0)
    dummy = args.model is None
    # token ids below 10001 (every shape's vocabulary holds them) and inside a real checkpoint's vocabulary
    from carpool.config import ModelConfig

    vocab = 10001 if dummy else ModelConfig.from_pretrained(args.model).vocab_size
    prompt = [random.randint(0, min(10000, vocab - 1)) for _ in range(args.prompt_len)]
    config_dir = os.path.join(args.checkpoint_dir, f"{args.shape}-{args.quant_format or 'bf16'}-config")
    model = args.model or write_config(config_dir, args.shape, quant_format=args.quant_format)
    engine_kwargs: dict[str, Any] = dict(max_num_seqs=8, max_model_len=args.prompt_len + args.new_tokens + 16,
                                         **engine_flags(args))
    if dummy:
        engine_kwargs["load_format"] = "dummy"
    bandwidth = measure_copy_bandwidth()
    result: dict[str, Any] = {"benchmark": "latency/batch1", "device": device_name(),
                              "model": args.model or f"{args.shape} (random {args.quant_format or 'bf16'} weights)",
                              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                              "tensor_parallel_size": args.tensor_parallel_size,
                              "engine_args": engine_kwargs,
                              "copy_bandwidth_bytes_per_s": bandwidth}
    result["carpool"] = run_carpool(model, prompt, args.new_tokens, args.repeats, engine_kwargs, args.profile,
                                    args.breakdown or args.tensor_parallel_size > 1)
    result["ms_per_token"] = result["carpool"]["ms_per_token"]
    if dummy:
        fmt = args.quant_format or args.quantization
        kv_fp8 = args.kv_cache_dtype == "fp8"
        result["roofline"] = roofline(args, bandwidth, LINEAR_BYTES[fmt], 1 if kv_fp8 else 2)
        result["roofline_ratio"] = result["ms_per_token"] / result["roofline"]["ms_per_token"]
        result["roofline_ms_per_token"] = result["roofline"]["ms_per_token"]
        if args.peer_bf16 and (fmt is not None or kv_fp8):
            bf16_kwargs = {**engine_kwargs, "quantization": None, "kv_cache_dtype": "auto"}
            bf16_model = write_config(os.path.join(args.checkpoint_dir, f"{args.shape}-bf16-config"), args.shape)
            peer = run_carpool(bf16_model, prompt, args.new_tokens, args.repeats, bf16_kwargs)
            peer_roofline = roofline(args, bandwidth, LINEAR_BYTES[None], 2)
            result["bf16"] = {**peer, "roofline_ms_per_token": peer_roofline["ms_per_token"],
                              "roofline_ratio": peer["ms_per_token"] / peer_roofline["ms_per_token"]}
            result["ms_per_token_vs_bf16"] = result["ms_per_token"] / peer["ms_per_token"]
    if args.hf:
        result["hf"] = run_hf(model, prompt, args.new_tokens)
        result["hf_ms_per_token"] = result["hf"]["ms_per_token"]
        result["speedup_vs_hf"] = result["hf_ms_per_token"] / result["ms_per_token"]
    emit(result, args.out)


if __name__ == "__main__":
    main()
