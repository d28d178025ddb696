"""Serving benchmark: load a running OpenAI-compatible server and measure what its clients see.

Requests are sent to /v1/completions with streaming on, arriving as a Poisson process at each
--request-rate (inf = all at once), optionally capped at --max-concurrency in flight. The dataset is
either random token ids (prompt and output lengths uniform in [min, max], ignore_eos so every request
generates exactly its output length) or a JSONL file of {"prompt": ..., "max_tokens"?: ...} lines.

Per request: TTFT (send -> first token), ITL (gaps between streamed chunks), TPOT ((e2e - TTFT) /
(output tokens - 1)), E2E. Prints one JSON object {"config": ..., "runs": [one per rate]}; with several
rates it also draws latency against rate into a PNG (if matplotlib is installed).

Run: `carpool bench serve --base-url http://127.0.0.1:8000 --request-rate 5 10 20`
or `python benchmarks/bench_serve.py ...` (same flags).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SampleRequest:
    prompt: str | list[int]
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address (default: %(default)s)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--dataset", default="random", help="'random' or the path of a JSONL file of prompts")
    p.add_argument("--num-prompts", type=int, default=200, help="requests per rate (default: %(default)s)")
    p.add_argument("--input-len-min", type=int, default=100, help="random prompts: shortest (tokens)")
    p.add_argument("--input-len-max", type=int, default=1024, help="random prompts: longest (tokens)")
    p.add_argument("--output-len-min", type=int, default=100, help="output length, shortest (tokens)")
    p.add_argument("--output-len-max", type=int, default=1024,
                   help="output length, longest (tokens); also used for JSONL lines without max_tokens")
    p.add_argument("--random-vocab-size", type=int, default=256,
                   help="random prompts draw token ids from [0, N) (default: 256, valid for any model)")
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="requests per second, Poisson arrivals; several values -> one run each (default: inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of every request (default: greedy)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not measured) before the runs")
    p.add_argument("--output-json", default=None, help="also write the JSON result to this file")
    p.add_argument("--plot", default="bench_serve.png",
                   help="PNG of latency vs request rate, drawn when several rates are given (default: %(default)s)")


def make_dataset(ns: argparse.Namespace) -> list[SampleRequest]:
    rng = random.Random(ns.seed)
    for low, high, name in ((ns.input_len_min, ns.input_len_max, "input-len"),
                            (ns.output_len_min, ns.output_len_max, "output-len")):
        if not 1 <= low <= high:
            raise ValueError(f"{name}: need 1 <= min <= max, got [{low}, {high}]")
    if ns.dataset == "random":
        # Drawn in the order of nano-vllm's bench.py (every prompt, then every output length), so with
        # --random-vocab-size 10001 --seed 0 this is exactly the offline workload of bench_throughput.py.
        prompts = [[rng.randint(0, ns.random_vocab_size - 1)
                    for _ in range(rng.randint(ns.input_len_min, ns.input_len_max))] for _ in range(ns.num_prompts)]
        out_lens = [rng.randint(ns.output_len_min, ns.output_len_max) for _ in range(ns.num_prompts)]
        return [SampleRequest(p, n) for p, n in zip(prompts, out_lens)]
    lines = []
    with open(ns.dataset) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                lines.append(SampleRequest(row["prompt"], int(row.get("max_tokens") or
                                                              rng.randint(ns.output_len_min, ns.output_len_max))))
    if not lines:
        raise ValueError(f"dataset: {ns.dataset} holds no prompts")
    return [lines[i % len(lines)] for i in range(ns.num_prompts)]


async def send_one(client: Any, url: str, model: str, sample: SampleRequest,
                   temperature: float = 0.0) -> RequestResult:
    body = {"model": model, "prompt": sample.prompt, "max_tokens": sample.max_tokens, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "stream error")
                    return result
                if not chunk.get("choices"):
                    continue  # the usage chunk carries no token
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.ttft > 0.0
    except Exception as e:  # a failed request is counted, not fatal
        result.error = f"{type(e).__name__}: {e}"
    return result


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    s = sorted(values)

    def pct(q: float) -> float:
        k = (len(s) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"mean": 1000 * sum(s) / len(s), "p50": 1000 * pct(0.5), "p90": 1000 * pct(0.9),
            "p99": 1000 * pct(0.99)}


def summarize(rate: float, max_concurrency: int | None, results: list[RequestResult], duration: float
              ) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": max_concurrency,
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "total_output_tokens": out_tokens,
        "ttft_ms": _percentiles([r.ttft for r in ok]),
        "tpot_ms": _percentiles(tpot),
        "itl_ms": _percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": _percentiles([r.e2e for r in ok]),
    }


async def run_rate(client: Any, url: str, model: str, dataset: list[SampleRequest], rate: float,
                   max_concurrency: int | None, seed: int, temperature: float = 0.0) -> dict[str, Any]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def limited(sample: SampleRequest) -> RequestResult:
        if limit is None:
            return await send_one(client, url, model, sample, temperature)
        async with limit:
            return await send_one(client, url, model, sample, temperature)

    start = time.perf_counter()
    tasks = []
    for i, sample in enumerate(dataset):
        if i > 0 and math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
        tasks.append(asyncio.create_task(limited(sample)))
    results = await asyncio.gather(*tasks)
    return summarize(rate, max_concurrency, list(results), time.perf_counter() - start)


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    import httpx

    dataset = make_dataset(ns)
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    base = ns.base_url.rstrip("/")
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        model = ns.model
        if model is None:
            resp = await client.get(f"{base}/v1/models")
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        url = f"{base}/v1/completions"
        for sample in dataset[:ns.warmup]:
            await send_one(client, url, model, sample, ns.temperature)
        runs = [await run_rate(client, url, model, dataset, rate, ns.max_concurrency, ns.seed + i, ns.temperature)
                for i, rate in enumerate(ns.request_rate)]
    config = {k: v for k, v in vars(ns).items() if k in {
        "base_url", "dataset", "num_prompts", "input_len_min", "input_len_max", "output_len_min",
        "output_len_max", "max_concurrency", "seed", "temperature", "random_vocab_size"}}
    return {"config": {**config, "model": model}, "runs": runs}


def plot(result: dict[str, Any], path: str) -> str | None:
    """Latency percentiles against request rate; needs matplotlib (not a carpool dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; skipping the plot", stacklevel=2)
        return None
    runs = [r for r in result["runs"] if r["request_rate"] != "inf"]
    rates = [r["request_rate"] for r in runs]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"), ("TTFT", "TPOT", "ITL", "E2E")):
        for stat in ("p50", "p90", "p99"):
            ax.plot(rates, [r[key][stat] for r in runs], marker="o", label=stat)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['config']['model']} at {result['config']['base_url']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(ns: argparse.Namespace) -> int:
    result = asyncio.run(run(ns))
    if len(ns.request_rate) > 1:
        result["plot"] = plot(result, ns.plot)
    text = json.dumps(result, indent=2)
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if all(r["failed"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    sys.exit(main(parser.parse_args()))
