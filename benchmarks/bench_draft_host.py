"""Host time of speculative decoding with a draft model at batch 1, model work removed (runs on CPU).

At batch 1 the demo pair's steps are launch- and host-bound (the main demo model is ~25M parameters), so
what a draft-model cycle costs the host decides its speed-up. Here every model forward returns zeros of
the right shape and every CUDA graph replay does nothing (the graph runners are built on the CPU, their
static buffers in host memory), so an engine step's wall time is its host work: input preparation,
uploads (host copies here), graph bookkeeping, sampling over zero logits, scheduling. Zero logits make
every guess token 0 and every verification accept all k guesses, the steady state of a fully accepted
cycle (the catch-up at its widest, k + 1 tokens).

Reported: ms per engine step of the plain engine, ms per cycle of the draft-model engine and, of that,
ms inside DraftModelProposer.propose (its graph replays, the catch-up's and the single-token chain's,
counted by kind), and ms per step of an n-gram engine (its verification steps). A GPU adds each launch's
driver cost on top; this measures the Python/NumPy side.
  python benchmarks/bench_draft_host.py --model carpool/demo_models/main --draft-model carpool/demo_models/draft
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend's graph code on CPU (no kernel runs)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name, emit  # noqa: E402


def install_no_op_model_work() -> dict[str, int]:
    """Forwards return zeros, graph replays do nothing; returns the replay counter (by graph kind)."""
    import torch

    from carpool.models.llama import LlamaForCausalLM
    from carpool.ops import triton as triton_sampling
    from carpool.worker import model_runner
    from carpool.worker.cuda_graph import CUDAGraphRunner

    counts: dict[str, int] = {}

    def forward(self, input_ids, positions, batch):
        return torch.zeros(len(input_ids), self.config.hidden_size, dtype=self.config.dtype)

    def compute_logits(self, hidden):
        return torch.zeros(len(hidden), self.config.vocab_size, dtype=torch.float32)

    def capture(self: CUDAGraphRunner) -> None:
        for shape in self.shapes:
            kind = "decode" if shape.query_len == 1 else "verify"
            self.graphs[shape] = _Replay(counts, kind)
            self.logits[shape] = torch.zeros(shape.num_tokens, self.model.config.vocab_size)

    def sample_from_logits(logits, temperature, seeds):  # the one-pass sampling kernel, greedy rows only
        return logits.argmax(dim=-1)

    triton_sampling.sample_from_logits = sample_from_logits
    LlamaForCausalLM.forward = forward
    LlamaForCausalLM.compute_logits = compute_logits
    CUDAGraphRunner.capture = capture
    model_runner.ModelRunner.use_cuda_graphs = property(  # type: ignore[assignment]
        lambda self: self.attention.supports_cuda_graphs and not self.config.enforce_eager)
    try:
        from carpool.spec_decode.draft_chain import DraftChainGraphs

        def capture_chain(self: DraftChainGraphs) -> None:
            for bs in self.batch_sizes:
                self.graphs[bs] = _Replay(counts, "chain")
        DraftChainGraphs.capture = capture_chain
    except ImportError:  # a tree without single-token chain graphs
        pass
    return counts


class _Replay:
    def __init__(self, counts: dict[str, int], kind: str) -> None:
        self.counts, self.kind = counts, kind

    def replay(self) -> None:
        self.counts[self.kind] = self.counts.get(self.kind, 0) + 1


def timed_steps(llm: Any, prompt: list[int], new_tokens: int) -> tuple[list[float], int]:
    """Host seconds of each engine step after the first (the prefill), and the tokens they emitted."""
    from carpool import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    engine.add_request(None, {"prompt_token_ids": prompt}, params)
    engine.step()
    times: list[float] = []
    emitted = 0
    before = sum(len(r.output_token_ids) for r in engine.core.scheduler.requests.values())
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - start)
        for out in outs:
            if out.finished:
                emitted += len(out.outputs[0].token_ids) - before
    return times, emitted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft-model", required=True)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=401)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    counts = install_no_op_model_work()
    import torch

    torch.set_num_threads(1)  # small CPU ops stand in for kernel launches: no thread pool wake-ups
    import numpy as np

    from carpool import LLM
    from carpool.spec_decode.draft_model import DraftModelProposer

    propose_s: list[float] = []
    real_propose = DraftModelProposer.propose

    def propose(self, batch, rows, max_lens):
        start = time.perf_counter()
        out = real_propose(self, batch, rows, max_lens)
        propose_s.append(time.perf_counter() - start)
        return out
    DraftModelProposer.propose = propose  # type: ignore[method-assign]

    prompt = np.random.default_rng(0).integers(2, 8000, args.prompt_len).tolist()
    kwargs = dict(device="cpu", kernel_backend="triton", max_num_seqs=8, max_model_len=2048)
    plain = LLM(args.model, **kwargs)
    timed_steps(plain, prompt, 20)  # warm-up
    plain_times, plain_tokens = timed_steps(plain, prompt, args.new_tokens)
    plain.engine.shutdown()

    spec = {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": args.k}
    llm = LLM(args.model, **kwargs, speculative_config=spec)
    timed_steps(llm, prompt, 20)
    propose_s.clear()
    counts.clear()
    spec_times, spec_tokens = timed_steps(llm, prompt, args.new_tokens)
    cycles = len(spec_times)
    draft_replays = dict(counts)
    llm.engine.shutdown()

    # n-gram lookup on the same engine settings: its verification step's host time (zero logits: every
    # guess is token 0, so lookups match once the output repeats)
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    llm = LLM(args.model, **kwargs, speculative_config=ngram)
    timed_steps(llm, prompt, 20)
    ngram_times, ngram_tokens = timed_steps(llm, prompt, args.new_tokens)
    llm.engine.shutdown()

    def ms(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1e3, 4)

    emit({"device": device_name(), "k": args.k, "prompt_len": args.prompt_len,
          "plain_step_host_ms": ms(plain_times), "plain_tokens_per_step": round(plain_tokens / len(plain_times), 3),
          "draft_cycle_host_ms": ms(spec_times), "draft_tokens_per_cycle": round(spec_tokens / cycles, 3),
          "propose_host_ms": ms(propose_s), "cycle_minus_propose_ms": round(ms(spec_times) - ms(propose_s), 4),
          "ngram_step_host_ms": ms(ngram_times), "ngram_tokens_per_step": round(ngram_tokens / len(ngram_times), 3),
          "replays_per_cycle": {k: round(v / cycles, 3) for k, v in draft_replays.items()},
          # host time per emitted token, the draft engine's over the plain engine's (< 1: the draft cycle's
          # host work is cheaper per token than plain decoding's)
          "host_ms_per_token_draft_over_plain": round((ms(spec_times) * cycles / spec_tokens)
                                                      / (ms(plain_times) * len(plain_times) / plain_tokens), 4)},
         args.out)


if __name__ == "__main__":
    main()
