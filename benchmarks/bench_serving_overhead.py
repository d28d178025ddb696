"""Serving overhead without a GPU: saturated `carpool serve` output tok/s against offline LLM.generate, on
the same model and workload, in one run.

The model is tiny (hidden 64, one layer, random weights via --load-format dummy) so that one step of 256
running requests costs a few milliseconds on one CPU core, as a step of a small model does on a GPU;
the vocabulary is a 32k byte-level BPE (trained in seconds on Python's own sources) so detokenization
costs what it costs with a real tokenizer. Offline, the engine alone sets the pace; served, the
frontend's per-token work (detokenization, SSE chunks, HTTP) competes with it. The ratio of the two is
the serving overhead; it is measured for each frontend mode given (`process`: the engine core in its
own process, the default; `thread`: --disable-frontend-multiprocessing).

Each served mode also reports the CPU seconds its processes (server, engine core, load generator) used
during the saturated run, since on a small machine they compete for cores, and the TTFT of a moderate
Poisson load (--moderate-rate), where a request should be scheduled within a step of arriving.

Every process runs with one torch thread (OMP_NUM_THREADS=1): engine, server and load generator share
the machine's cores, and the offline run gets the same single core the engine gets when served.

Run: `python benchmarks/bench_serving_overhead.py [--modes process thread] [--num-prompts 512]`; prints
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--modes", nargs="+", default=["process", "thread"], choices=["process", "thread"],
                   help="server frontend modes to measure (default: both)")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--input-len-min", type=int, default=16)
    p.add_argument("--input-len-max", type=int, default=64)
    p.add_argument("--output-len-min", type=int, default=64)
    p.add_argument("--output-len-max", type=int, default=192)
    p.add_argument("--moderate-rate", type=float, default=8.0,
                   help="also send --moderate-prompts requests at this Poisson rate (req/s) and report TTFT; "
                        "0 = skip (default: %(default)s)")
    p.add_argument("--moderate-prompts", type=int, default=80)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-dir", default=None, help="where the model is built (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None, help="also write the JSON result to this file")


def _bench_serve() -> Any:
    spec = importlib.util.spec_from_file_location("carpool_bench_serve", os.path.join(HERE, "bench_serve.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_model(path: str, hidden: int, layers: int, vocab: int) -> str:
    """config.json (no weights: --load-format dummy) and a byte-level BPE tokenizer of `vocab` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": max(1, hidden // 32), "num_key_value_heads": max(1, hidden // 32),
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:200]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


def serve_namespace(ns: argparse.Namespace, base_url: str, moderate: bool = False) -> argparse.Namespace:
    return argparse.Namespace(
        base_url=base_url, model=None, api_key=None, dataset="random",
        num_prompts=ns.moderate_prompts if moderate else ns.num_prompts,
        input_len_min=ns.input_len_min, input_len_max=ns.input_len_max, output_len_min=ns.output_len_min,
        output_len_max=ns.output_len_max, random_vocab_size=256,
        request_rate=[ns.moderate_rate if moderate else float("inf")],
        max_concurrency=None if moderate else ns.max_concurrency, seed=ns.seed, temperature=0.0, warmup=1,
        output_json=None,
        plot="")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def process_tree(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return [pid]
    return [pid] + [q for k in kids for q in process_tree(k)]


def run_offline(path: str, dataset: list[Any]) -> dict[str, Any]:
    import torch

    from carpool import LLM, SamplingParams

    torch.set_num_threads(1)
    llm = LLM(model=path, load_format="dummy", device="cpu", max_num_seqs=256)
    params = [SamplingParams(temperature=0.0, max_tokens=d.max_tokens, ignore_eos=True) for d in dataset]
    llm.generate([dataset[0].prompt], params[0], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([d.prompt for d in dataset], params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.engine.shutdown()
    return {"duration_s": duration, "total_output_tokens": tokens, "output_throughput": tokens / duration}


def run_server(path: str, mode: str, ns: argparse.Namespace, bench_serve: Any) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "carpool.entrypoints.cli", "serve", path, "--load-format", "dummy",
           "--device", "cpu", "--port", "0", "--max-num-seqs", "256"]
    if mode == "thread":
        cmd.append("--disable-frontend-multiprocessing")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"on (http://\S+)", line)
        if match is None:
            raise RuntimeError(f"the server did not start: {line!r}")
        url = match.group(1)
        pids = process_tree(proc.pid)  # the server, and its engine core process if it has one
        before = [cpu_seconds(p) for p in pids] + [time.process_time()]
        run = asyncio.run(bench_serve.run(serve_namespace(ns, url)))["runs"][0]
        after = [cpu_seconds(p) for p in pids] + [time.process_time()]
        out = {k: run[k] for k in ("completed", "failed", "duration_s", "output_throughput", "total_output_tokens",
                                   "ttft_ms", "tpot_ms", "itl_ms")}
        used = [b - a for a, b in zip(before, after)]
        out["cpu_s"] = {"server": used[0], **({"engine_core": sum(used[1:-1])} if len(pids) > 1 else {}),
                        "load_generator": used[-1]}
        if ns.moderate_rate > 0:
            moderate = asyncio.run(bench_serve.run(serve_namespace(ns, url, moderate=True)))["runs"][0]
            out["moderate_load"] = {k: moderate[k] for k in ("request_rate", "completed", "failed", "ttft_ms",
                                                             "tpot_ms", "output_throughput")}
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main(ns: argparse.Namespace) -> int:
    os.environ["OMP_NUM_THREADS"] = "1"
    bench_serve = _bench_serve()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(ns.model_dir or os.path.join(tmp, "model"), ns.hidden_size, ns.num_layers, ns.vocab_size)
        dataset = bench_serve.make_dataset(serve_namespace(ns, ""))
        offline = run_offline(path, dataset)
        served = {mode: run_server(path, mode, ns, bench_serve) for mode in ns.modes}
    for run in served.values():
        run["ratio_to_offline"] = run["output_throughput"] / offline["output_throughput"]
    result = {"config": {k: v for k, v in vars(ns).items() if k not in ("output_json", "model_dir")},
              "cpu_count": os.cpu_count(), "offline": offline, "served": served}
    text = json.dumps(result, indent=2)
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            f.write(text + "\n")
    print(text)
    failed = sum(r["failed"] + r.get("moderate_load", {}).get("failed", 0) for r in served.values())
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    sys.exit(main(parser.parse_args()))
