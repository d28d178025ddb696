"""Speculative decoding with CUDA graphs (marked gpu; run through scripts/gpu_suite.sh on an H100/H200):
verification steps (narrower requests padded to the widest one's width) and the draft model's steps
(catch-ups, and the single-token ones chained in one graph) replay captured graphs, and greedy output
stays token for token greedy's without speculation. float32, so that only the step shapes (graphs
against eager, verification against decode) could change a token."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import prompts_of_lengths
from test_gpu_engine import build_gpu_checkpoint
from test_spec_decode import smaller_draft

from carpool import LLM, SamplingParams
from carpool.spec_decode.draft_chain import DraftChainGraphs
from carpool.worker.cuda_graph import CUDAGraphRunner, GraphShape

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

K = 3
# Small KV caches, so that the engines of a test fit on one GPU side by side.
KV = dict(dtype="float32", kv_cache_memory_bytes=1 << 28)


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory) -> str:
    return build_gpu_checkpoint(str(tmp_path_factory.mktemp("gpu-spec-qwen3")))


def prompts() -> list[list[int]]:
    seg = prompts_of_lengths([40, 25], seed=7)
    return [seg[0] * 3, seg[1] * 2 + seg[0], *prompts_of_lengths([300, 9, 77], seed=8)]


def generate(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in batch], params,
                                                         use_tqdm=False)]


def spec_config(method: str, path: str, tmp_path, reference: list[list[int]]) -> dict:
    if method == "draft_model":
        return {"method": "draft_model", "model": smaller_draft(path, str(tmp_path / "draft")),
                "num_speculative_tokens": K}
    rec = tmp_path / "rec.json"  # every proposal k long: uniform verifications
    rec.write_text(json.dumps({"prompt_token_ids": prompts(), "output_token_ids": reference}))
    return {"method": "replay", "num_speculative_tokens": K, "acceptance_rate": 0.7, "replay_path": str(rec)}


@pytest.mark.parametrize("method", ["replay", "draft_model"])
def test_graphed_verifications_give_greedy_tokens_without_speculation(gpu_checkpoint, tmp_path, monkeypatch,
                                                                      method):
    plain = LLM(gpu_checkpoint, device="cuda", **KV)
    reference = generate(plain, prompts())
    reference_one = generate(plain, prompts()[:1])
    del plain
    replays: list[tuple[int, GraphShape, int]] = []
    real_run = CUDAGraphRunner.run

    def run(self, inputs, fixup=None, shape=None):
        replays.append((id(self), shape or self.choose(inputs), len(inputs.rows)))
        return real_run(self, inputs, fixup, shape)

    monkeypatch.setattr(CUDAGraphRunner, "run", run)
    chains: list[int] = []
    real_chain_run = DraftChainGraphs.run

    def chain_run(self, block_table, first_position, live_steps, first_guesses):
        chains.append(len(first_position))
        return real_chain_run(self, block_table, first_position, live_steps, first_guesses)

    monkeypatch.setattr(DraftChainGraphs, "run", chain_run)
    llm = LLM(gpu_checkpoint, device="cuda", **KV,
              speculative_config=spec_config(method, gpu_checkpoint, tmp_path, reference))
    assert generate(llm, prompts()) == reference  # 5 requests: verifications padded to 8
    assert generate(llm, prompts()[:1]) == reference_one  # batch 1
    runner = llm.engine.core.executor.runner  # type: ignore[attr-defined]
    assert GraphShape(1, K + 1) in runner.graph_runner.graphs
    target = [(shape, b) for r, shape, b in replays if r == id(runner.graph_runner)]
    assert any(s.query_len == K + 1 and s.num_reqs > b for s, b in target)  # padded
    assert any(s == GraphShape(1, K + 1) and b == 1 for s, b in target)
    if method == "draft_model":
        draft = runner.proposer.graph_runner
        assert GraphShape(1, K + 1) in draft.graphs  # the catch-up after a verification emitting K + 1
        widths = {shape.query_len for r, shape, _ in replays if r == id(draft)}
        assert widths - {1}  # the catch-ups after verifications
        assert chains and 1 in chains  # the single-token steps, in the chain graph (batch 1 included)
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0


def test_graphed_ngram_verifications_mixing_widths_give_greedy_tokens_without_speculation(gpu_checkpoint,
                                                                                         monkeypatch):
    """n-gram lookup proposes up to k tokens for the repetitive prompts and often nothing for the random
    ones: verification steps mixing widths replay the graph of their widest request's width."""
    reference = generate(LLM(gpu_checkpoint, device="cuda", **KV), prompts())
    replays: list[tuple[int, GraphShape, tuple[int, ...]]] = []
    real_run = CUDAGraphRunner.run

    def run(self, inputs, fixup=None, shape=None):
        widths = tuple(int(w) for w in inputs.query_start_loc[1:] - inputs.query_start_loc[:-1])
        replays.append((id(self), shape or self.choose(inputs), widths))
        return real_run(self, inputs, fixup, shape)

    monkeypatch.setattr(CUDAGraphRunner, "run", run)
    spec = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
    llm = LLM(gpu_checkpoint, device="cuda", **KV, speculative_config=spec)
    assert generate(llm, prompts()) == reference
    runner = llm.engine.core.executor.runner  # type: ignore[attr-defined]
    mixed = [(s, w) for r, s, w in replays if r == id(runner.graph_runner) and len(set(w)) > 1]
    assert mixed and all(s.query_len == max(w) for s, w in mixed)
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0


def test_graphed_verifications_give_the_same_tokens_as_eager_ones(gpu_checkpoint, tmp_path):
    spec = {"method": "draft_model", "model": smaller_draft(gpu_checkpoint, str(tmp_path / "draft")),
            "num_speculative_tokens": K}
    graphed = generate(LLM(gpu_checkpoint, device="cuda", **KV, speculative_config=spec), prompts())
    eager = generate(LLM(gpu_checkpoint, device="cuda", **KV, speculative_config=spec,
                         enforce_eager=True), prompts())
    assert graphed == eager


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("draft_tp", [None, 1], ids=["draft-split-over-ranks", "draft-whole-on-rank-0"])
def test_tensor_parallel_draft_with_graphs_gives_greedy_tokens_without_speculation(gpu_checkpoint, tmp_path,
                                                                                   draft_tp):
    spec = {"method": "draft_model", "model": smaller_draft(gpu_checkpoint, str(tmp_path / "draft")),
            "num_speculative_tokens": K, "draft_tensor_parallel_size": draft_tp}
    plain = LLM(gpu_checkpoint, device="cuda", **KV, tensor_parallel_size=2)
    try:
        reference = generate(plain, prompts())
    finally:
        plain.engine.shutdown()
    llm = LLM(gpu_checkpoint, device="cuda", **KV, tensor_parallel_size=2, speculative_config=spec)
    try:
        assert generate(llm, prompts()) == reference
        assert llm.engine.stats().spec_decode_num_accepted_tokens > 0
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("method", ["replay", "draft_model"])
def test_verifications_as_decode_rows_give_greedy_tokens_without_speculation(gpu_checkpoint, tmp_path, method):
    """KernelConfig.short_query_decode: verification graphs (and the draft's catch-ups) captured over one
    decode row per query token keep greedy's tokens."""
    reference = generate(LLM(gpu_checkpoint, device="cuda", **KV), prompts())
    llm = LLM(gpu_checkpoint, device="cuda", **KV, short_query_decode=True,
              speculative_config=spec_config(method, gpu_checkpoint, tmp_path, reference))
    assert generate(llm, prompts()) == reference
    runner = llm.engine.core.executor.runner  # type: ignore[attr-defined]
    assert runner.graph_runner.batches[GraphShape(1, K + 1)].attn.max_query_len == 1  # decode rows
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0
