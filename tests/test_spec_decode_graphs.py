"""CUDA graphs for speculative decoding's steps, on CPU: which steps replay a graph (uniform widths, padded
batches) and which run eagerly, what a verification replay writes into the static inputs, and whole
engines whose graph replays are stood in for by the same forward over the same static buffers (Triton
kernels in the interpreter), giving greedy's tokens without speculation. The captures themselves need a
GPU: tests/test_spec_decode_gpu.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from triton_cases import DEVICE, interpreter_only, poison_outputs

from carpool.config import SpeculativeConfig
from carpool.worker.cuda_graph import (
    CUDAGraphRunner,
    GraphIndex,
    GraphShape,
    choose_graph,
    verification_graph_shapes,
)
from carpool.worker.input_batch import PendingFixup, StepInputs

CAPTURED = GraphIndex.of({GraphShape(bs, w) for w in (1, 3, 5) for bs in (1, 2, 4, 8)}
                         | {GraphShape(16, 1), GraphShape(16, 1, True)})


def qsl(*widths: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)


@pytest.mark.parametrize("widths, expected", [
    ((5,), GraphShape(1, 5)),
    ((3, 3, 3), GraphShape(4, 3)),  # padded to the next captured batch size
    ((1,) * 5, GraphShape(8, 1)),
    ((5,) * 8, GraphShape(8, 5)),
])
def test_uniform_steps_take_the_smallest_graph_of_their_width_that_fits(widths, expected):
    assert choose_graph(qsl(*widths), 0, CAPTURED) == expected


@pytest.mark.parametrize("widths", [
    (5, 1),  # a speculating request beside a plain one
    (3, 5, 3),  # proposals of different lengths
    (4,),  # a width without graphs
    (5,) * 9,  # more requests than the largest graph of that width
    (1, 5),
])
def test_mixed_or_uncaptured_steps_run_eagerly(widths):
    assert choose_graph(qsl(*widths), 0, CAPTURED) is None


def test_only_decode_steps_with_a_shared_prefix_take_the_cascade_graph():
    assert choose_graph(qsl(*(1,) * 12), 256, CAPTURED) == GraphShape(16, 1, True)
    assert choose_graph(qsl(*(1,) * 12), 0, CAPTURED) == GraphShape(16, 1)
    assert choose_graph(qsl(*(1,) * 3), 256, CAPTURED) == GraphShape(4, 1)  # no cascade graph of 4


def test_verification_graphs_cover_every_width_below_disable_by_batch_size(llama_path):
    from carpool import EngineArgs

    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2, "disable_by_batch_size": 12}
    config = EngineArgs(model=llama_path, device="cpu", max_num_seqs=64, speculative_config=spec).create_engine_config()
    assert verification_graph_shapes(config) == ((2, 3, 4, 5), 11)
    assert verification_graph_shapes(dataclasses.replace(config, speculative_config=None)) == ((), 0)
    never = SpeculativeConfig.from_dict({**spec, "disable_by_batch_size": None})
    assert verification_graph_shapes(dataclasses.replace(config, speculative_config=never))[1] == 64


def test_verification_graphs_stop_at_verify_graph_max_tokens():
    from carpool.attention.triton_paged import TritonAttentionBackend
    from carpool.worker.cuda_graph import VERIFY_GRAPH_MAX_TOKENS

    model = SimpleNamespace(attention_layers=lambda: [SimpleNamespace(num_kv_heads=2)])
    runner = CUDAGraphRunner(model, TritonAttentionBackend(), 64, 512, 8, torch.device(DEVICE),  # type: ignore[arg-type]
                             verify_widths=(2, 9), verify_max_num_seqs=64)
    verify = [s for s in runner.shapes if s.query_len > 1]
    assert max(s.num_tokens for s in verify) <= VERIFY_GRAPH_MAX_TOKENS
    assert {s.num_reqs for s in verify if s.query_len == 2} == {1, 2, 4, 8, 16, 32, 48, 64}
    assert choose_graph(qsl(*(9,) * 20), 0, runner.index) is None  # 180 tokens, but no graph of 32 x 9
    assert choose_graph(qsl(*(2,) * 20), 0, runner.index) == GraphShape(32, 2)


def test_a_step_plan_is_found_but_never_built_while_a_graph_is_captured(monkeypatch):
    """A plan built during capture would bake its upload (from host memory freed afterwards) into the
    graph: a graph's plans must come from its warm-up on the same metadata."""
    from carpool.forward_batch import AttentionMetadata
    from carpool.ops.triton import utils

    meta = AttentionMetadata(query_start_loc=torch.tensor([0, 3]), seq_lens=torch.tensor([10]),
                             block_tables=torch.zeros(1, 2), slot_mapping=torch.zeros(3), max_query_len=3,
                             max_seq_len=10, query_start_loc_cpu=[0, 3], seq_lens_cpu=[10])
    assert utils.step_plan(meta, "tiles", lambda qsl, lens: 7) == 7  # warm-up
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert utils.step_plan(meta, "tiles", lambda qsl, lens: 8) == 7
    with pytest.raises(RuntimeError, match="built during CUDA graph capture"):
        utils.step_plan(meta, "other", lambda qsl, lens: 9)


def fake_graphs(runner: CUDAGraphRunner, logits_width: int = 3) -> list[dict]:
    """Replays that record the static inputs; each graph's logits row t holds t (so reads can be traced)."""
    seen: list[dict] = []
    for shape in runner.shapes:
        runner.graphs[shape] = SimpleNamespace(replay=lambda s=shape: seen.append(
            {**{name: t.to("cpu", copy=True) for name, t in runner.staged.tensors.items()}, "shape": s,
             "block_tables": runner.block_tables.to("cpu", copy=True)}))
        runner.logits[shape] = torch.arange(shape.num_tokens, dtype=torch.float32).repeat(logits_width, 1).T
    return seen


def verification(lens: list[int], width: int, table_width: int, salt: int) -> StepInputs:
    """Requests with contexts `lens` (after the step) verifying width - 1 proposed tokens each."""
    b, w = len(lens), width
    positions = np.concatenate([np.arange(n - w, n) for n in lens]).astype(np.int64)
    return StepInputs(rows=np.arange(b), input_ids=np.arange(b * w, dtype=np.int64) + salt, positions=positions,
                      slot_mapping=positions + salt, query_start_loc=qsl(*(w,) * b),
                      seq_lens=np.array(lens, dtype=np.int32),
                      block_tables=np.arange(b * table_width, dtype=np.int32).reshape(b, table_width) + salt,
                      sample_rows=np.arange(b), logits_indices=np.arange(b * w, dtype=np.int64),
                      max_query_len=w, max_seq_len=max(lens), pending_token_index=np.zeros(0, dtype=np.int64),
                      pending_rows=np.zeros(0, dtype=np.int64), num_drafts=np.full(b, w - 1))


def test_verification_replay_writes_real_requests_then_whole_padded_ones():
    """Real requests keep the eager packing (request i's W tokens at i * W) and their logits are read there;
    padded requests attend W keys of block 0 from positions 0 .. W - 1 and store nothing. Steps of
    different sizes alternate, so each host mirror is rewritten over another step's values."""
    from carpool.attention.triton_paged import TritonAttentionBackend

    model = SimpleNamespace(attention_layers=lambda: [SimpleNamespace(num_kv_heads=2)])
    runner = CUDAGraphRunner(model, TritonAttentionBackend(), 8, 4096, 4, torch.device(DEVICE),  # type: ignore[arg-type]
                             verify_widths=(2, 5), verify_max_num_seqs=8)
    seen = fake_graphs(runner)
    cases = [([30, 70, 12], 5, 20, 100), ([9], 2, 3, 200), ([40] * 5, 5, 12, 300), ([6, 8], 5, 2, 400)]
    for lens, w, table_width, salt in cases:
        inputs = verification(lens, w, table_width, salt)
        logits = runner.run(inputs)
        got, b = seen[-1], len(lens)
        bs = got["shape"].num_reqs
        assert got["shape"] == GraphShape(bs, w) and bs == min(s for s in runner.batch_sizes if s >= b)
        t, total = b * w, bs * w
        assert torch.equal(logits[:, 0], torch.arange(t, dtype=torch.float32))
        for name in ("input_ids", "positions", "slot_mapping"):
            assert got[name][:t].tolist() == getattr(inputs, name).tolist(), name
        assert got["seq_lens"][:b].tolist() == lens
        assert torch.equal(got["block_tables"][:b, :table_width], torch.from_numpy(inputs.block_tables))
        assert (got["slot_mapping"][t:total] == -1).all() and (got["seq_lens"][b:bs] == w).all()
        assert got["positions"][t:total].tolist() == list(range(w)) * (bs - b)
        assert (got["block_tables"][b:bs, :-(-w // 4)] == 0).all()  # a padded request's W keys: block 0
        assert runner.query_start_locs[w][:bs + 1].tolist() == [i * w for i in range(bs + 1)]


def test_verification_replay_writes_device_tokens_over_their_input_ids():
    from carpool.attention.triton_paged import TritonAttentionBackend

    model = SimpleNamespace(attention_layers=lambda: [SimpleNamespace(num_kv_heads=2)])
    runner = CUDAGraphRunner(model, TritonAttentionBackend(), 4, 512, 8, torch.device(DEVICE),  # type: ignore[arg-type]
                             verify_widths=(3,), verify_max_num_seqs=4)
    seen = fake_graphs(runner)
    inputs = verification([20, 33], 3, 5, 0)
    values = torch.tensor([777, 888], dtype=torch.long, device=DEVICE)
    runner.run(inputs, PendingFixup(np.array([3, 0], dtype=np.int64), values))
    expected = inputs.input_ids.copy()
    expected[[3, 0]] = [777, 888]
    assert seen[-1]["input_ids"][:6].tolist() == expected.tolist()


def test_verification_graphs_refuse_a_width_of_one():
    from carpool.attention.triton_paged import TritonAttentionBackend

    model = SimpleNamespace(attention_layers=lambda: [SimpleNamespace(num_kv_heads=2)])
    with pytest.raises(ValueError, match="^verify_widths:"):
        CUDAGraphRunner(model, TritonAttentionBackend(), 4, 512, 8, torch.device(DEVICE),  # type: ignore[arg-type]
                        verify_widths=(1, 3), verify_max_num_seqs=4)


# ---- whole engines, graph replays stood in for on CPU -----------------------------------------------------

@pytest.fixture
def stand_in_graphs(monkeypatch):
    """Engines whose runners (target and draft) build CUDAGraphRunners on CPU; each "replay" runs the forward
    a capture records, over the same static buffers and graph metadata, through the Triton interpreter.
    Returns the (graph runner, graph shape, real requests) of every replay. One decode split everywhere: the interpreter
    runs each idle split (the split count only shapes the work, never the result)."""
    from carpool.ops.triton import attention as tri_attention
    from carpool.worker import model_runner

    poison_outputs(monkeypatch)  # attention rows a kernel leaves unwritten are NaN
    monkeypatch.setattr(tri_attention, "DECODE_SPLIT_TABLE", ((1 << 30, 1),))
    monkeypatch.setattr(model_runner.ModelRunner, "use_cuda_graphs",
                        property(lambda self: self.attention.supports_cuda_graphs and not self.config.enforce_eager))
    replays: list[tuple[CUDAGraphRunner, GraphShape, int]] = []

    def capture(self: CUDAGraphRunner) -> None:
        for shape in self.shapes:
            self.batches[shape] = self._batch(shape)

            def replay(s: GraphShape = shape) -> None:
                self.logits[s] = self._forward(self.batches[s])
            self.graphs[shape] = SimpleNamespace(replay=replay)

    real_run = CUDAGraphRunner.run

    def run(self, inputs, fixup=None, shape=None):
        replays.append((self, shape or self.choose(inputs), len(inputs.rows)))
        return real_run(self, inputs, fixup, shape)

    monkeypatch.setattr(CUDAGraphRunner, "capture", capture)
    monkeypatch.setattr(CUDAGraphRunner, "run", run)
    return replays


@interpreter_only
def test_graphed_verification_and_draft_steps_give_greedy_tokens_without_speculation(llama_path, tmp_path,
                                                                                     stand_in_graphs):
    """Three requests speculate with a draft model (verifications of 3 tokens each, replayed padded to a
    batch of 4) beside a penalized one that never speculates (while it runs, mixed widths: eager); the
    draft's single-token steps replay its decode graphs, its catch-ups its graphs of several tokens per row."""
    from checkpoints import prompts_of_lengths
    from test_spec_decode import smaller_draft

    from carpool import LLM, SamplingParams

    prompts = prompts_of_lengths([6, 11, 9, 7], seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (9, 8, 9)]
    params.append(SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, repetition_penalty=1.2))
    spec = {"method": "draft_model", "model": smaller_draft(llama_path, str(tmp_path / "draft")),
            "num_speculative_tokens": 2}
    reference = LLM(llama_path, device="cpu").generate([{"prompt_token_ids": p} for p in prompts], params,
                                                      use_tqdm=False)
    llm = LLM(llama_path, device="cpu", kernel_backend="triton", max_num_seqs=8, block_size=8,
              speculative_config=spec)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
    runner = llm.engine.core.executor.runner  # type: ignore[attr-defined]
    verified = {(s.query_len, b, s.num_reqs) for r, s, b in stand_in_graphs
                if r is runner.graph_runner and s.query_len > 1}
    assert (3, 3, 4) in verified
    draft = [s.query_len for r, s, _ in stand_in_graphs if r is runner.proposer.graph_runner]
    assert 1 in draft  # the single-token steps
    assert any(w > 1 for w in draft)  # the catch-ups after verifications
    stats = llm.engine.stats()
    assert 0 < stats.spec_decode_num_accepted_tokens < stats.spec_decode_num_draft_tokens


@interpreter_only
def test_graphed_draft_catch_ups_propose_what_eager_ones_propose(llama_path, tmp_path, stand_in_graphs,
                                                                 monkeypatch):
    """Two rows run while a third request waits for a row: when it enters, its prompt's catch-up runs
    eagerly beside the other row's graphed one, and every proposal of the engine equals the one an engine
    without draft graphs makes at the same point."""
    from checkpoints import prompts_of_lengths
    from test_spec_decode import smaller_draft

    from carpool import LLM, SamplingParams
    from carpool.spec_decode.draft_model import DraftModelProposer

    calls: list[tuple[list[list[int]], int, list[tuple[int, int]]]] = []
    real_propose = DraftModelProposer.propose

    def propose(self, batch, rows, max_lens):
        first = len(stand_in_graphs)
        out = real_propose(self, batch, rows, max_lens)
        replays = [(s.query_len, b) for r, s, b in stand_in_graphs[first:] if r is self.graph_runner]
        calls.append((out, int(np.count_nonzero(max_lens)), replays))
        return out

    monkeypatch.setattr(DraftModelProposer, "propose", propose)
    prompts = [{"prompt_token_ids": p} for p in prompts_of_lengths([5, 7, 6], seed=2)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 6, 4)]
    spec = {"method": "draft_model", "model": smaller_draft(llama_path, str(tmp_path / "draft")),
            "num_speculative_tokens": 2}
    kwargs = dict(device="cpu", max_num_seqs=2, block_size=8, speculative_config=spec)
    graphed = LLM(llama_path, **kwargs, kernel_backend="triton").generate(prompts, params, use_tqdm=False)
    graphed_calls, calls[:] = list(calls), []
    eager = LLM(llama_path, **kwargs).generate(prompts, params, use_tqdm=False)  # (torch_ref: no graphs)
    assert [o.outputs[0].token_ids for o in graphed] == [o.outputs[0].token_ids for o in eager]
    assert [c[0] for c in graphed_calls] == [c[0] for c in calls]
    # (k = 2: a catch-up and one single-token step.) A call for two rows replayed both steps, the catch-up
    # for one row: the other's ran eagerly.
    assert any(n == 2 and len(replays) == 2 and replays[0][1] == 1 for _, n, replays in graphed_calls)
