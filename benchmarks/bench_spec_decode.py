"""Speculative decoding: what verification costs and what it buys, as ratios measured in one run.

1. verify_cost: ms of one step verifying k = 1..8 proposed tokens at batch 1, over ms of one plain decode
   step (the same engine settings; plain and verification steps replay CUDA graphs at batch 1). The
   weight-bound ideal is ~1.0: a step reads the weights once whatever its query length. Shape: Llama-3-8B
   with random bf16 weights (--shape), a --context-len prompt.
2. replay: tokens/s with the replay proposer (the target's own recorded greedy tokens, each kept with
   probability `acceptance_rate`) over tokens/s without speculation, at batch 1, 8, 32 and 256: the
   mechanics' ceiling, independent of any proposer's quality. Speculation is forced on at every batch
   size here; `load_aware` repeats the largest batch with the default disable_by_batch_size.
3. real (with --model PATH): n-gram and, with --draft-model, the draft model on an input-grounded
   workload (a source file, then its start again with one identifier renamed), tokens/s over plain at
   batch 1 and at --throughput-batch (load awareness on, as configured by default); acceptance rates.
   The methods' engines run side by side and their runs are interleaved over --repeats rounds.

Parts 1 and 2 use the model of --model when given (then no shape arithmetic), else --shape with dummy
weights. Prints one JSON object (and writes it to --out). A smoke run on CPU with a tiny checkpoint:
  python benchmarks/bench_spec_decode.py --model DIR --device cpu --new-tokens 12 --context-len 16 \
      --prompt-len 16 --batch-sizes 1,2 --ks 1,2 --rates 0.5,1.0 --throughput-batch 3 --source-chars 150
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SHAPES, add_engine_flags, device_name, emit, engine_flags, write_config  # noqa: E402


# ---- helpers ------------------------------------------------------------------------------------------
def make_llm(model: str, engine_kwargs: dict[str, Any], speculative_config: dict[str, Any] | None = None) -> Any:
    from carpool import LLM

    return LLM(model, speculative_config=speculative_config, **engine_kwargs)


def release(llm: Any) -> None:
    llm.engine.shutdown()
    del llm
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def spec_counts(llm: Any) -> dict[str, Any]:
    s = llm.engine.stats()
    return {"drafts": s.spec_decode_num_drafts, "draft_tokens": s.spec_decode_num_draft_tokens,
            "accepted_tokens": s.spec_decode_num_accepted_tokens,
            "accepted_per_pos": list(s.spec_decode_num_accepted_tokens_per_pos)}


def acceptance(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    drafts = after["drafts"] - before["drafts"]
    draft_tokens = after["draft_tokens"] - before["draft_tokens"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    per_pos = [a - b for a, b in zip(after["accepted_per_pos"], before["accepted_per_pos"])]
    return {"acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
            "mean_accepted_length": accepted / drafts if drafts else 0.0, "num_drafts": drafts,
            "accepted_per_pos": [round(p / drafts, 4) if drafts else 0.0 for p in per_pos]}


class LaunchCounter:
    """Counts the steps the engine core launches (wraps its executor's launch; benchmark-only)."""

    def __init__(self, llm: Any) -> None:
        self.count = 0
        executor = llm.engine.core.executor
        launch = executor.launch

        def counted(scheduler_output: Any) -> Any:
            self.count += 1
            return launch(scheduler_output)

        executor.launch = counted


@dataclasses.dataclass(frozen=True)
class BatchRun:
    seconds: float  # decode time: from the step where every request has its first token to the end
    outputs: list[list[int]]
    steps: int  # steps launched in that time
    tokens: int  # output tokens generated in that time (counted, not assumed)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_batch(llm: Any, prompts: list[list[int]], new_tokens: int) -> BatchRun:
    """Generate greedily for all prompts at once, stepping the engine by hand. Decode time starts once
    every request has its first token; the tokens counted are those generated after that point. (In a
    large batch the first requests decode while the last ones prefill, and a speculating engine emits
    several tokens per step then, and spends longer in that phase when its draft catches up on prompts:
    assuming new_tokens - 1 per request in the window would credit it with tokens made before it.)"""
    from carpool import SamplingParams

    engine = llm.engine
    counter = getattr(llm, "_launch_counter", None) or LaunchCounter(llm)
    llm._launch_counter = counter
    llm.reset_prefix_cache()
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    ids = [engine.add_request(None, {"prompt_token_ids": p}, params) for p in prompts]
    outputs: dict[str, list[int]] = {}
    started: float | None = None
    first_launch = 0
    tokens_before = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        running = engine.core.scheduler.requests.values()
        if started is None and engine.stats().num_waiting == 0 and all(r.output_token_ids for r in running):
            _sync()
            started = time.perf_counter()
            first_launch = counter.count
            tokens_before = sum(len(o) for o in outputs.values()) + sum(len(r.output_token_ids) for r in running)
    _sync()
    assert started is not None
    seconds = time.perf_counter() - started
    result = [outputs[i] for i in ids]
    return BatchRun(seconds, result, counter.count - first_launch, sum(len(o) for o in result) - tokens_before)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def set_speculation(llm: Any, num_speculative_tokens: int, disable_by_batch_size: int | None,
                    acceptance_rate: float | None = None) -> None:
    """Benchmark-only: change a live single-process engine's speculation (k, load awareness, the replay
    rate) instead of building a new 8B engine for each point. Scheduler and runner read these per step."""
    core = llm.engine.core
    runner = core.executor.runner
    spec = dataclasses.replace(core.config.speculative_config, num_speculative_tokens=num_speculative_tokens,
                               disable_by_batch_size=disable_by_batch_size)
    core.scheduler.spec = spec
    runner.config = dataclasses.replace(runner.config, speculative_config=spec)
    if acceptance_rate is not None:
        runner.proposer.acceptance_rate = acceptance_rate


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(0, vocab - 1) for _ in range(length)] for _ in range(n)]


# ---- parts 1 and 2: the mechanics (replay proposer) ----------------------------------------------------
def mechanics(model: str, engine_kwargs: dict[str, Any], args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    ks = [int(k) for k in args.ks.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    context = random_prompts(1, args.context_len, vocab, seed=1)
    batches = {b: random_prompts(b, args.prompt_len, vocab, seed=100 + b) for b in batch_sizes}

    # Plain engine: the baselines, and the greedy outputs the replay proposer will propose.
    llm = make_llm(model, engine_kwargs)
    run_batch(llm, context, 8)  # warm-up
    run = run_batch(llm, context, args.new_tokens)
    context_out = run.outputs
    plain_step_ms = 1e3 * run.seconds / run.steps
    plain_context_tps = run.tokens_per_s
    plain: dict[int, float] = {}
    recorded = {"prompt_token_ids": context, "output_token_ids": context_out}
    for b, prompts in batches.items():
        run = run_batch(llm, prompts, args.new_tokens)
        plain[b] = run.tokens_per_s
        recorded["prompt_token_ids"] = recorded["prompt_token_ids"] + prompts
        recorded["output_token_ids"] = recorded["output_token_ids"] + run.outputs
    release(llm)

    path = os.path.join(tempfile.mkdtemp(prefix="carpool-replay-"), "recorded.json")
    with open(path, "w") as f:
        json.dump(recorded, f)
    k_max = max(max(ks), args.k)
    llm = make_llm(model, engine_kwargs, {"method": "replay", "num_speculative_tokens": k_max,
                                          "acceptance_rate": 1.0, "replay_path": path,
                                          "disable_by_batch_size": None})
    run_batch(llm, context, 8)  # warm-up (eager shapes)
    verify: dict[str, Any] = {}
    for k in ks:
        set_speculation(llm, k, None, 1.0)
        run = run_batch(llm, context, args.new_tokens)
        step_ms = 1e3 * run.seconds / run.steps
        # (in bf16 on a GPU a verification's kernels may round a near-tie differently from decode's; the
        # replay then stops proposing where the outputs part: reported, not asserted)
        verify[str(k)] = {"ms_per_step": step_ms, "cost_ratio": step_ms / plain_step_ms,
                          "greedy_equals_plain": run.outputs == context_out,
                          "tokens_per_step": run.tokens / run.steps,
                          "speedup": run.tokens_per_s / plain_context_tps}
    replay: dict[str, Any] = {}
    for b, prompts in batches.items():
        row: dict[str, Any] = {"plain_tokens_per_s": plain[b]}
        for rate in rates:
            set_speculation(llm, args.k, None, rate)
            before = spec_counts(llm)
            tps = run_batch(llm, prompts, args.new_tokens).tokens_per_s
            row[str(rate)] = {"speedup": tps / plain[b], "tokens_per_s": tps,
                              **acceptance(before, spec_counts(llm))}
        replay[str(b)] = row
    largest = max(batch_sizes)
    set_speculation(llm, args.k, args.disable_by_batch_size, max(rates))
    load_aware = {"batch": largest, "disable_by_batch_size": args.disable_by_batch_size,
                  "throughput_ratio": run_batch(llm, batches[largest], args.new_tokens).tokens_per_s / plain[largest]}
    release(llm)
    return {"plain_decode_step_ms": plain_step_ms, "verify_cost": verify,
            "replay": {"num_speculative_tokens": args.k, "by_batch": replay, "load_aware": load_aware}}


# ---- part 3: real weights, input-grounded workload ----------------------------------------------------
def grounded_prompts(tokenizer: Any, n: int, chars: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """Prompts that hold a source file of this repository and then start it again with one identifier
    renamed (its first quarter): continuing means copying text already in the context (with the rename),
    where n-gram lookup and a draft model both do well, and a base model trained on code (the demo models)
    continues it without any chat format. (A chat-template request to repeat the file made the demo model
    loop on a code fence, a workload both proposers predict trivially.) The files are this checkout's, so
    another commit's workload differs slightly. A prompt longer than max_tokens is built again from a
    shorter part of its file."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "carpool")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py"))
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        with open(files[rng.randrange(len(files))]) as f:
            whole = f.read()
        pick = rng.random()
        size = chars
        while True:
            src = whole[:size]
            names = sorted({w for w in src.replace("(", " ").replace(".", " ").split() if w.isidentifier()
                            and len(w) > 5})
            old = names[int(pick * len(names))] if names else "self"
            head = src[:max(1, len(src) // 4)].replace(old, f"{old}_{i}")
            text = f"{src}\n\n# The same file again, with `{old}` renamed to `{old}_{i}`:\n\n{head}"
            ids = tokenizer(text)["input_ids"]
            if len(ids) <= max_tokens or size < 64:
                break
            size //= 2
        prompts.append(ids[-max_tokens:])
    return prompts


def profile_batch1(llm: Any, prompt: list[int], new_tokens: int, steps: int = 20) -> dict[str, Any]:
    """A torch.profiler window over `steps` batch-1 engine steps once the request decodes: device time per
    step against the step's wall time, so host-bound steps (device idle between kernels) show as such."""
    from profile_util import profile_steps

    from carpool import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    engine.add_request(None, {"prompt_token_ids": prompt}, params)
    for _ in range(3):  # the prefill (and the draft's catch-up on the prompt)
        engine.step()
    _sync()
    started = time.perf_counter()
    summary = profile_steps(engine, steps)
    summary["wall_ms_per_step_profiled"] = 1e3 * (time.perf_counter() - started) / max(summary["steps"], 1)
    summary.pop("last_step_critical_path", None)
    while engine.has_unfinished_requests():
        engine.step()
    return summary


def real_models(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Part 3. Every method's engine stays alive (the demo pair is small) and the runs are interleaved:
    --repeats rounds, each running every method once on each batch-1 prompt and once on the large batch,
    the order rotated per round. A host-bound step (the demo model's at batch 1 and at 256) moves by
    10-20% between runs on a shared host, so ratios of runs minutes apart in separate engines were noise
    as much as signal; here each ratio pairs runs made seconds apart. Reported: batch-1 tokens/s over all
    rounds, and the median of the per-round ratios at the large batch (with every round's)."""
    from carpool.engine.llm_engine import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    assert tokenizer is not None, "--model needs a tokenizer for the input-grounded workload"
    from carpool.config import ModelConfig

    limit = ModelConfig.from_pretrained(args.model).max_model_len - args.new_tokens - 8
    one = grounded_prompts(tokenizer, 4, args.source_chars, limit)
    many = grounded_prompts(tokenizer, args.throughput_batch, args.source_chars, limit, seed=1)
    kwargs = dict(engine_kwargs, max_model_len=max(len(p) for p in one + many) + args.new_tokens + 8)
    kwargs.pop("load_format", None)
    # engines side by side: each takes a fixed KV budget (the large batch's contexts at 8 KiB a token
    # and more) instead of profiling the free memory the engines built before it left
    kwargs.setdefault("kv_cache_memory_bytes", args.kv_cache_gib << 30)
    methods: dict[str, dict[str, Any] | None] = {
        "plain": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": args.lookup_min,
                  "prompt_lookup_max": args.lookup_max}}
    if args.draft_model:
        methods["draft_model"] = {"method": "draft_model", "model": args.draft_model,
                                  "num_speculative_tokens": args.k}
    llms = {name: make_llm(args.model, kwargs, spec) for name, spec in methods.items()}
    names = list(llms)
    for llm in llms.values():
        run_batch(llm, one[:1], 8)  # warm-up
    # Three engines' objects live in this process: a full collection would walk them all inside whichever
    # timed run crosses the threshold (the engine-core process freezes its heap the same way)
    gc.collect()
    gc.freeze()
    zero = {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0, "accepted_per_pos": [0] * args.k}
    counted = {name: dict(zero) for name in names}  # the batch-1 runs' speculation counts
    b1 = {name: [0.0, 0, 0] for name in names}  # seconds, tokens, steps
    bn: dict[str, list[float]] = {name: [] for name in names}
    many_tokens: dict[str, tuple[int, int]] = {}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for prompt in one:  # batch 1, one prompt after the other
            for name in order:
                start = spec_counts(llms[name])
                run = run_batch(llms[name], [prompt], args.new_tokens)
                end, total = spec_counts(llms[name]), counted[name]
                for key in ("drafts", "draft_tokens", "accepted_tokens"):
                    total[key] += end[key] - start[key]
                total["accepted_per_pos"] = [t + b - a for t, a, b in zip(total["accepted_per_pos"],
                                                                          start["accepted_per_pos"],
                                                                          end["accepted_per_pos"])]
                acc = b1[name]
                acc[0], acc[1], acc[2] = acc[0] + run.seconds, acc[1] + run.tokens, acc[2] + run.steps
        for name in order:
            run = run_batch(llms[name], many, args.new_tokens)
            bn[name].append(run.tokens_per_s)
            many_tokens[name] = (run.tokens, sum(len(o) for o in run.outputs))
    out: dict[str, Any] = {"num_speculative_tokens": args.k, "repeats": args.repeats}
    n = args.throughput_batch
    for name in names:
        seconds, tokens, steps = b1[name]
        row: dict[str, Any] = {"batch1_tokens_per_s": tokens / seconds,
                               "batch1_ms_per_step": 1e3 * seconds / max(steps, 1)}
        if methods[name] is not None:  # acceptance of the batch-1 runs
            row.update(acceptance(zero, counted[name]))
        # (the decode window's share of all tokens: unlike shares mean the engines' windows differ)
        row[f"batch{n}_tokens_per_s"] = statistics.median(bn[name])
        row[f"batch{n}_tokens_per_s_by_round"] = bn[name]
        row[f"batch{n}_decode_window_tokens"], row[f"batch{n}_total_tokens"] = many_tokens[name]
        if name != "plain":
            row["batch1_speedup"] = row["batch1_tokens_per_s"] / out["plain"]["batch1_tokens_per_s"]
            ratios = [a / b for a, b in zip(bn[name], bn["plain"])]
            row[f"batch{n}_throughput_ratio"] = statistics.median(ratios)
            row[f"batch{n}_throughput_ratio_by_round"] = ratios
        out[name] = row
    if args.profile:  # after the timed runs: the profiler's overhead stays out of them
        for name in names:
            out[name]["batch1_profile"] = profile_batch1(llms[name], one[0], args.new_tokens)
    for llm in llms.values():
        release(llm)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--model", default=None, help="a real checkpoint: parts 1-2 run on it and part 3 runs")
    ap.add_argument("--draft-model", default=None, help="part 3: a draft checkpoint with --model's vocabulary")
    ap.add_argument("--checkpoint-dir", default="/tmp/carpool-bench")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--context-len", type=int, default=512, help="part 1: the prompt of the batch-1 request")
    ap.add_argument("--prompt-len", type=int, default=128, help="part 2: prompt length of each request")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ks", default="1,2,3,4,5,6,7,8", help="part 1: proposed tokens per verification")
    ap.add_argument("--k", type=int, default=4, help="parts 2-3: num_speculative_tokens")
    ap.add_argument("--rates", default="0.0,0.5,0.7,0.8,0.9,1.0", help="part 2: replay acceptance rates")
    ap.add_argument("--batch-sizes", default="1,8,32,256")
    ap.add_argument("--disable-by-batch-size", type=int, default=None,
                    help="load-aware runs (default: SpeculativeConfig's default)")
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--lookup-max", type=int, default=5)
    ap.add_argument("--throughput-batch", type=int, default=256, help="part 3: the large batch")
    ap.add_argument("--source-chars", type=int, default=2000,
                    help="part 3: characters of source per prompt (2000: prompt and output stay inside the demo "
                         "models' 1024-token training context)")
    ap.add_argument("--repeats", type=int, default=3, help="part 3: interleaved rounds of every method's runs")
    ap.add_argument("--kv-cache-gib", type=int, default=4, help="part 3: KV cache of each engine (they coexist)")
    ap.add_argument("--skip-mechanics", action="store_true", help="only part 3")
    ap.add_argument("--profile", action="store_true",
                    help="part 3: a torch.profiler summary of 20 batch-1 steps of each method (device vs wall time)")
    add_engine_flags(ap)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from carpool.config import DEFAULT_DISABLE_BY_BATCH_SIZE, ModelConfig

    if args.disable_by_batch_size is None:
        args.disable_by_batch_size = DEFAULT_DISABLE_BY_BATCH_SIZE
    if args.profile and args.device == "cpu":
        ap.error("--profile times CUDA kernels: it needs a GPU")
    assert args.tensor_parallel_size == 1, "the benchmark changes speculation on a single-process engine"
    largest = max(int(b) for b in args.batch_sizes.split(","))
    model = args.model or write_config(os.path.join(args.checkpoint_dir, f"{args.shape}-config"), args.shape)
    engine_kwargs: dict[str, Any] = dict(max_num_seqs=max(largest, args.throughput_batch),
                                         max_model_len=max(args.context_len, args.prompt_len) + args.new_tokens + 16,
                                         max_num_batched_tokens=8192, async_scheduling=True, **engine_flags(args))
    if args.device:
        engine_kwargs["device"] = args.device
    if args.model is None:
        engine_kwargs["load_format"] = "dummy"
    vocab = min(ModelConfig.from_pretrained(model).vocab_size, 10000)
    result: dict[str, Any] = {"benchmark": "spec_decode", "device": device_name(),
                              "model": args.model or f"{args.shape} (random bf16 weights)",
                              "engine_args": engine_kwargs, "new_tokens": args.new_tokens}
    if not args.skip_mechanics:
        result |= mechanics(model, engine_kwargs, args, vocab)
    if args.model:
        result["real"] = real_models(args, engine_kwargs)
    emit(result, args.out)


if __name__ == "__main__":
    main()
