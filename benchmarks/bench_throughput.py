"""Offline throughput, reported against the roofline measured in the same run and against HF
transformers side by side.

Workloads:
- random (nano-vllm's bench.py): random.seed(0); 256 prompts of randint(0, 10000) token ids with lengths
  randint(100, 1024); then 256 output lengths randint(100, 1024) as max_tokens, ignore_eos, temperature 0.6.
- shared-prefix: 256 requests = one 2,000-token system prefix + distinct 50-300-token suffixes, 128 output
  tokens each, run with prefix caching on and then off.
- prefill: 32 (--num-prompts) prompts of 4,000 (--input-len) random token ids, one output token each:
  prompt tokens per second, against the prefill FLOPs at the measured bf16 matmul rate.

--peer-bf16 (with --quant-format, --quantization or --kv-cache-dtype fp8) runs the same workload again with
bf16 weights and a bf16 KV cache in the same process and reports the ratio.

Roofline time = (sum over requests of K/V bytes read by all its decode steps + sum over decode steps of
the weight bytes the step reads) / B + (prefill FLOPs + decode FLOPs) / F, with B the measured copy
bandwidth and F the measured bf16 matmul rate. A dense model's step reads all weights; a mixture of
experts' step reads the non-expert weights plus, per sparse layer, the expected number of distinct experts
its batch of b decoding requests selects under uniform routing, E (1 - (1 - k/E)^b) (Qwen3-30B-A3B: 8 of
128 at b = 1, 125.9 at b = 64, 128 from b ~ 150; common.ModelArithmetic). Prints one JSON object (and writes
it to --out).
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
    ModelArithmetic,
    add_engine_flags,
    device_name,
    emit,
    engine_flags,
    measure_copy_bandwidth,
    measure_matmul_flops,
    write_config,
    write_random_checkpoint,
)


def random_workload(num_prompts: int = 256, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    random.seed(seed)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num_prompts)]
    out_lens = [random.randint(100, 1024) for _ in range(num_prompts)]
    return prompts, out_lens


def shared_prefix_workload(num_prompts: int = 256, prefix_len: int = 2000, seed: int = 0,
                           vocab: int = 10000) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randint(0, vocab - 1) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randint(0, vocab - 1) for _ in range(rng.randint(50, 300))] for _ in range(num_prompts)]
    return prompts, [128] * num_prompts


def prefill_workload(num_prompts: int, input_len: int, seed: int = 0,
                     vocab: int = 10000) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(0, vocab - 1) for _ in range(input_len)] for _ in range(num_prompts)], [1] * num_prompts


def roofline(shape: str, prompts: list[list[int]], out_lens: list[int], bandwidth: float, flops: float,
             max_num_seqs: int, cached_prefix: int = 0, linear_bytes: float = 2.0,
             kv_dtype_bytes: int = 2) -> dict[str, float]:
    """Lower bound on the run time: the bytes every step must move and the FLOPs it must do (weights and
    K/V at the bytes they are stored in: common.ModelArithmetic; FLOPs at the bf16 rate)."""
    m = ModelArithmetic.of(shape, linear_bytes, kv_dtype_bytes)
    kv_bytes = 0
    prefill_flops = 0
    decode_flops = 0
    for prompt, out in zip(prompts, out_lens):
        p = len(prompt)
        new = p - cached_prefix
        # prefill: every new prompt token through the layers; attention over keys 1..p; one LM head row
        prefill_flops += new * m.linear_flops_per_token + m.lm_head_flops
        prefill_flops += m.attn_flops_per_key * (p * (p + 1) // 2 - cached_prefix * (cached_prefix + 1) // 2)
        # decode step i (1..out-1) computes 1 token attending p + i keys and reads their K/V
        steps = out - 1
        keys = steps * p + steps * (steps + 1) // 2
        kv_bytes += keys * m.kv_bytes_per_token
        decode_flops += steps * (m.linear_flops_per_token + m.lm_head_flops) + keys * m.attn_flops_per_key
    # decode steps when every request decodes in the same step (up to max_num_seqs at a time): step s of a
    # wave decodes the wave's requests with more than s + 1 output tokens
    order = sorted(out_lens, reverse=True)
    decode_steps, step_weight_bytes = 0, 0.0
    for i in range(0, len(order), max_num_seqs):
        wave = order[i:i + max_num_seqs]
        decode_steps += wave[0] - 1
        batch = len(wave)
        for s in range(wave[0] - 1):
            while wave[batch - 1] - 1 <= s:
                batch -= 1
            step_weight_bytes += m.decode_weight_bytes(batch)
    seconds = (kv_bytes + step_weight_bytes) / bandwidth + (prefill_flops + decode_flops) / flops
    result: dict[str, float] = {"roofline_seconds": seconds, "kv_bytes": kv_bytes, "weight_bytes": m.weight_bytes,
                                "decode_steps": decode_steps, "decode_weight_bytes": step_weight_bytes,
                                "prefill_flops": prefill_flops, "decode_flops": decode_flops}
    if m.num_experts:
        result["expert_bytes"] = m.expert_bytes
        result["mean_distinct_experts_per_step"] = (step_weight_bytes / decode_steps - m.weight_bytes) / m.expert_bytes
    return result


def run_carpool(model: str, prompts: list[list[int]], out_lens: list[int], temperature: float,
                engine_kwargs: dict[str, Any], profile: bool = False) -> dict[str, Any]:
    from carpool import LLM, SamplingParams

    llm = LLM(model, **engine_kwargs)
    engine = llm.engine
    # warm-up: every prompt with a few output tokens, so that the run's prefill and mixed steps have all
    # been seen once and no kernel specialization is compiled inside the timed run (counted below)
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=temperature, max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.reset_prefix_cache()
    params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True, detokenize=False)
              for n in out_lens]
    from carpool.sampling_params import RequestOutputKind

    for p in params:
        p.output_kind = RequestOutputKind.FINAL_ONLY
    on_gpu = engine.config.device.startswith("cuda")
    if on_gpu:
        from profile_util import start_timings

        start_timings(engine)
    from profile_util import JitCompiles

    num_steps = 0
    finished = []
    with JitCompiles(counted=engine_kwargs.get("tensor_parallel_size", 1) == 1) as compiles:
        start = time.perf_counter()
        for prompt, p in zip(prompts, params):
            engine.add_request(None, {"prompt_token_ids": prompt}, p)
        while engine.has_unfinished_requests():
            outs = engine.step()
            num_steps += 1
            finished.extend(o for o in outs if o.finished)
        elapsed = time.perf_counter() - start
    out_tokens = sum(len(c.token_ids) for o in finished for c in o.outputs)
    result: dict[str, Any] = {"seconds": elapsed, "output_tokens": out_tokens, "tokens_per_s": out_tokens / elapsed,
                              "num_steps": num_steps, "num_preemptions": engine.stats().num_preemptions,
                              "num_kv_blocks": engine.stats().num_kv_blocks,
                              "mean_ttft_s": statistics.mean(o.metrics.time_to_first_token for o in finished),
                              "prefix_cache_hits": engine.stats().prefix_cache_hits,
                              "jit_compiles_in_run": compiles.summary()}
    if on_gpu:
        # Device time is measured with events around each step's kernels (rank 0's under TP); the wall
        # time they do not cover is host time the device waited for (exposed host overhead).
        from profile_util import stop_timings

        bd = stop_timings(engine, elapsed, num_steps)
        result["breakdown"] = bd
        gpu = bd["rank0"]["gpu_ms"]["mean"]
        if gpu:
            gpu_total = gpu * bd["rank0"]["steps"] / 1e3
            result["gpu_ms_per_step"] = gpu
            result["host_ms_per_step"] = 1e3 * max(elapsed - gpu_total, 0.0) / num_steps
            result["host_over_gpu"] = result["host_ms_per_step"] / gpu
            result["gpu_busy_fraction"] = gpu_total / elapsed
    if profile:
        # decode steps with every request running: all prompts in, then a profiled window
        from profile_util import profile_steps

        for prompt, p in zip(prompts, params):
            engine.add_request(None, {"prompt_token_ids": prompt}, p)
        while engine.core.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                                  for r in engine.core.scheduler.running):
            engine.step()
        for _ in range(20):
            engine.step()
        result["profile_batch"] = engine.core.scheduler.num_running
        result["profile"] = profile_steps(engine, 30)
        for r in list(engine.core.scheduler.requests):
            engine.abort(r)
        while engine.has_unfinished_requests():
            engine.step()
        # The whole workload once more under the profiler (device activity only, to keep its overhead
        # low): where all of the run's device time goes, prefill steps and the shrinking tail included.
        llm.reset_prefix_cache()
        for prompt, p in zip(prompts, params):
            engine.add_request(None, {"prompt_token_ids": prompt}, p)
        result["profile_whole_run"] = profile_steps(engine, 0, top=25, cpu=False)
    engine.shutdown()
    del llm, engine
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def run_hf(model: str, prompts: list[list[int]], out_lens: list[int], temperature: float,
           max_seconds: float = 240.0) -> dict[str, Any]:
    """HF transformers continuous batching (paged attention over SDPA), per-request max_new_tokens."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if any(name.endswith(".safetensors") for name in os.listdir(model)):
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="paged|sdpa",
                                                  device_map="cuda")
    else:  # a config only (--load-format dummy): random weights, as carpool's
        from transformers import AutoConfig

        with torch.device("cuda"):
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model), dtype=torch.bfloat16,
                                                  attn_implementation="paged|sdpa")
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max(out_lens),
                           eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    out_tokens = 0
    partial = False
    with hf.continuous_batching_context_manager(generation_config=gen, block=True, timeout=60) as manager:
        ids = []
        for p, n in zip(prompts, out_lens):
            try:
                ids.append(manager.add_request(p, max_new_tokens=n, eos_token_id=-1))
            except TypeError:  # older transformers: no per-request eos argument
                ids.append(manager.add_request(p, max_new_tokens=n))
        done = 0
        while done < len(ids):
            if time.perf_counter() - start > max_seconds:
                partial = True  # report the rate over the requests that finished in time
                break
            r = manager.get_result(timeout=5)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("HF continuous batching stopped early")
                continue
            if r.is_finished():
                done += 1
                out_tokens += len(r.generated_tokens)
    elapsed = time.perf_counter() - start
    del hf
    torch.cuda.empty_cache()
    return {"seconds": elapsed, "output_tokens": out_tokens, "tokens_per_s": out_tokens / elapsed,
            "attn_implementation": "paged|sdpa", "finished_requests": done, "partial": partial}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["random", "shared-prefix", "prefill"], default="random")
    ap.add_argument("--model", default=None, help="checkpoint dir; default: a random checkpoint of --shape")
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--checkpoint-dir", default="/tmp/carpool-bench")
    ap.add_argument("--num-prompts", type=int, default=None, help="default 256 (prefill: 32)")
    ap.add_argument("--input-len", type=int, default=4000, help="prefill: tokens per prompt")
    ap.add_argument("--peer-bf16", action="store_true",
                    help="with --quant-format, --quantization or --kv-cache-dtype fp8: the same workload with "
                         "bf16 weights and KV cache in the same run, and the ratio")
    ap.add_argument("--prefix-len", type=int, default=2000)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    add_engine_flags(ap)
    ap.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                    help="dummy: random weights from config.json only (no checkpoint written or read)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--hf", action="store_true", help="also run HF transformers on the same workload")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler summary of 30 decode steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fmt = args.quant_format or args.quantization
    if args.peer_bf16 and not (fmt or args.kv_cache_dtype == "fp8"):
        ap.error("--peer-bf16 compares a quantized run with bf16: pass --quant-format, --quantization or "
                 "--kv-cache-dtype fp8 too")
    if args.peer_bf16 and args.model is not None:
        ap.error("--peer-bf16 needs random weights of --shape (no --model): the bf16 peer is that shape")
    if args.quant_format and args.load_format != "dummy":
        ap.error("--quant-format writes a config only: pass --load-format dummy")
    if args.num_prompts is None:
        args.num_prompts = 32 if args.workload == "prefill" else 256

    import torch

    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    if args.model is None and args.load_format == "dummy":
        model = write_config(os.path.join(args.checkpoint_dir, f"{args.shape}-{args.quant_format or 'bf16'}-config"),
                             args.shape, quant_format=args.quant_format)
    else:
        model = args.model or write_random_checkpoint(os.path.join(args.checkpoint_dir, args.shape), args.shape)
    if args.model is None and not on_gpu:
        raise SystemExit("on CPU pass --model (e.g. the demo model path)")
    engine_kwargs: dict[str, Any] = dict(max_num_seqs=args.max_num_seqs,
                                         max_num_batched_tokens=args.max_num_batched_tokens,
                                         load_format=args.load_format, **engine_flags(args))
    if args.device:
        engine_kwargs["device"] = args.device
    result: dict[str, Any] = {"benchmark": f"throughput/{args.workload}", "device": device_name(),
                              "model": args.model or f"{args.shape} (random bf16 weights)",
                              "num_prompts": args.num_prompts, "engine_args": engine_kwargs}
    if on_gpu:
        # With TP the limit is every GPU's bandwidth and FLOP rate together (each measured like GPU 0).
        tp = args.tensor_parallel_size
        result["copy_bandwidth_bytes_per_s"] = bandwidth = measure_copy_bandwidth() * tp
        result["bf16_matmul_flops"] = flops = measure_matmul_flops() * tp
        result["tensor_parallel_size"] = tp
    import json

    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    if args.workload in ("random", "prefill"):
        if args.workload == "random":
            prompts, out_lens = random_workload(args.num_prompts)
        else:
            prompts, out_lens = prefill_workload(args.num_prompts, args.input_len)
            engine_kwargs.setdefault("max_model_len", args.input_len + 16)
        if vocab <= 10000:  # small models (the CPU demo): fold ids into the vocabulary
            prompts = [[t % vocab for t in p] for p in prompts]
        prompt_tokens = sum(len(p) for p in prompts)
        result["total_output_tokens"] = sum(out_lens)
        result["total_prompt_tokens"] = prompt_tokens

        def measure(model_dir: str, kwargs: dict[str, Any], linear_bytes: float, kv_bytes: int,
                    profile: bool) -> dict[str, Any]:
            run = run_carpool(model_dir, prompts, out_lens, args.temperature, kwargs, profile)
            run["prompt_tokens_per_s"] = prompt_tokens / run["seconds"]
            if on_gpu and args.model is None:  # (copy bandwidth and FLOP rate above are summed over the GPUs)
                rl = roofline(args.shape, prompts, out_lens, bandwidth, flops, args.max_num_seqs,
                              linear_bytes=linear_bytes, kv_dtype_bytes=kv_bytes)
                run["roofline"] = rl
                run["roofline_ratio"] = rl["roofline_seconds"] / run["seconds"]
            return run

        kv_bytes = 1 if args.kv_cache_dtype == "fp8" else 2
        result["carpool"] = measure(model, engine_kwargs, LINEAR_BYTES[fmt], kv_bytes, args.profile)
        key = "prompt_tokens_per_s" if args.workload == "prefill" else "tokens_per_s"
        result["tokens_per_s"] = result["carpool"]["tokens_per_s"]
        result["prompt_tokens_per_s"] = result["carpool"]["prompt_tokens_per_s"]
        for k in ("host_ms_per_step", "gpu_ms_per_step", "host_over_gpu"):
            if k in result["carpool"]:
                result[k] = result["carpool"][k]
        if "roofline" in result["carpool"]:
            rl = result["carpool"]["roofline"]
            result["roofline"] = rl
            result["roofline_tokens_per_s"] = sum(out_lens) / rl["roofline_seconds"]
            result["roofline_ratio"] = result["carpool"]["roofline_ratio"]
        if args.peer_bf16:
            bf16_model = write_config(os.path.join(args.checkpoint_dir, f"{args.shape}-bf16-config"), args.shape) \
                if args.load_format == "dummy" else model
            bf16_kwargs = {**engine_kwargs, "quantization": None, "kv_cache_dtype": "auto"}
            result["bf16"] = measure(bf16_model, bf16_kwargs, LINEAR_BYTES[None], 2, False)
            result[f"{key}_vs_bf16"] = result["carpool"][key] / result["bf16"][key]
        if args.hf:
            result["hf"] = run_hf(model, prompts, out_lens, args.temperature)
            result["hf_tokens_per_s"] = result["hf"]["tokens_per_s"]
            result["speedup_vs_hf"] = result["tokens_per_s"] / result["hf_tokens_per_s"]
    else:
        prompts, out_lens = shared_prefix_workload(args.num_prompts, args.prefix_len, vocab=min(vocab, 10000))
        on = run_carpool(model, prompts, out_lens, args.temperature, {**engine_kwargs, "enable_prefix_caching": True})
        off = run_carpool(model, prompts, out_lens, args.temperature, {**engine_kwargs, "enable_prefix_caching": False})
        result.update({"prefix_len": args.prefix_len, "caching_on": on, "caching_off": off,
                       "tokens_per_s": on["tokens_per_s"], "speedup": on["tokens_per_s"] / off["tokens_per_s"],
                       "ttft_ratio_off_over_on": off["mean_ttft_s"] / on["mean_ttft_s"]})
        if on_gpu and args.model is None:
            best = roofline(args.shape, prompts, out_lens, bandwidth, flops, args.max_num_seqs,
                            cached_prefix=args.prefix_len // 16 * 16)
            result["roofline_tokens_per_s"] = sum(out_lens) / best["roofline_seconds"]
            result["roofline_ratio"] = on["tokens_per_s"] / result["roofline_tokens_per_s"]
    emit(result, args.out)


if __name__ == "__main__":
    main()
