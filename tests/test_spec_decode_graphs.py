"""CUDA graphs for speculative decoding's steps, on CPU: which steps replay a graph (the widest request's
width, narrower requests padded in front; padded batches) and which run eagerly, what a verification
replay writes into the static inputs, and whole engines whose graph replays are stood in for by the same
forward over the same static buffers (Triton kernels in the interpreter), giving greedy's tokens without
speculation. The captures themselves need a GPU: tests/test_spec_decode_gpu.py."""

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


def lens(n: int, context: int = 64) -> np.ndarray:
    return np.full(n, context, dtype=np.int32)


@pytest.mark.parametrize("widths, expected", [
    ((5,), GraphShape(1, 5)),
    ((3, 3, 3), GraphShape(4, 3)),  # padded to the next captured batch size
    ((1,) * 5, GraphShape(8, 1)),
    ((5,) * 8, GraphShape(8, 5)),
])
def test_uniform_steps_take_the_smallest_graph_of_their_width_that_fits(widths, expected):
    assert choose_graph(qsl(*widths), lens(len(widths)), 0, CAPTURED) == expected


@pytest.mark.parametrize("widths, expected", [
    ((5, 1), GraphShape(2, 5)),  # a speculating request beside a plain one
    ((1, 5), GraphShape(2, 5)),
    ((3, 5, 3), GraphShape(4, 5)),  # proposals of different lengths
    ((1, 1, 3, 1, 2), GraphShape(8, 3)),
])
def test_mixed_steps_take_the_graph_of_their_widest_request(widths, expected):
    assert choose_graph(qsl(*widths), lens(len(widths)), 0, CAPTURED) == expected


@pytest.mark.parametrize("widths, context", [
    ((4,), 64),  # a width without graphs
    ((2, 4), 64),  # the widest request's width has none
    ((5,) * 9, 64),  # more requests than the largest graph of that width
    ((5, 1, 1), 4),  # a narrower request with less context than the graph's width
])
def test_uncaptured_steps_and_steps_too_short_to_pad_run_eagerly(widths, context):
    seq_lens = lens(len(widths))
    seq_lens[-1] = context
    assert choose_graph(qsl(*widths), seq_lens, 0, CAPTURED) is None


def test_only_decode_steps_with_a_shared_prefix_take_the_cascade_graph():
    assert choose_graph(qsl(*(1,) * 12), lens(12), 256, CAPTURED) == GraphShape(16, 1, True)
    assert choose_graph(qsl(*(1,) * 12), lens(12), 0, CAPTURED) == GraphShape(16, 1)
    assert choose_graph(qsl(*(1,) * 3), lens(3), 256, CAPTURED) == GraphShape(4, 1)  # no cascade graph of 4


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
    assert choose_graph(qsl(*(9,) * 20), lens(20), 0, runner.index) is None  # 180 tokens, no graph of 32 x 9
    assert choose_graph(qsl(*(2,) * 20), lens(20), 0, runner.index) == GraphShape(32, 2)


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


def test_a_mixed_verification_replay_pads_narrower_requests_in_front():
    """Request i's real queries are the last widths[i] of its W graph tokens, at their own positions and
    slots; the padding queries before them sit at the positions just before its first one and store
    nothing; logits are read at the real queries, and a device token lands on its request's input id.
    Uniform steps run first, so the mirror the mixed step fills holds another step's values."""
    from carpool.attention.triton_paged import TritonAttentionBackend
    from carpool.worker.input_batch import spread_logits_indices

    model = SimpleNamespace(attention_layers=lambda: [SimpleNamespace(num_kv_heads=2)])
    runner = CUDAGraphRunner(model, TritonAttentionBackend(), 4, 512, 8, torch.device(DEVICE),  # type: ignore[arg-type]
                             verify_widths=(2, 3, 4), verify_max_num_seqs=4)
    seen = fake_graphs(runner)
    runner.run(verification([40, 50, 60], 4, 8, 500))
    runner.run(verification([40, 50, 60], 4, 8, 600))
    widths, seq_lens, w = [4, 1, 2], [30, 17, 9], 4
    starts = qsl(*widths)
    positions = np.concatenate([np.arange(n - k, n) for n, k in zip(seq_lens, widths)]).astype(np.int64)
    num_drafts = np.array(widths) - 1
    inputs = StepInputs(rows=np.arange(3), input_ids=np.arange(7, dtype=np.int64) + 100, positions=positions,
                        slot_mapping=positions + 1000, query_start_loc=starts,
                        seq_lens=np.array(seq_lens, dtype=np.int32),
                        block_tables=np.arange(6, dtype=np.int32).reshape(3, 2) + 1,
                        sample_rows=np.arange(3), logits_indices=spread_logits_indices(starts[1:] - 1, num_drafts),
                        max_query_len=w, max_seq_len=30, pending_token_index=np.array([4]),
                        pending_rows=np.array([1]), num_drafts=num_drafts)
    logits = runner.run(inputs, PendingFixup(np.array([4], dtype=np.int64),
                                             torch.tensor([777], dtype=torch.long, device=DEVICE)))
    got = seen[-1]
    assert got["shape"] == GraphShape(4, w)
    real_ids = inputs.input_ids.copy()
    real_ids[4] = 777
    for i, (k, n) in enumerate(zip(widths, seq_lens)):
        ids, pos, slots = (got[name][i * w:(i + 1) * w].tolist() for name in ("input_ids", "positions", "slot_mapping"))
        real = slice(starts[i], starts[i + 1])
        assert ids == [0] * (w - k) + real_ids[real].tolist()
        assert pos == list(range(n - w, n))
        assert slots == [-1] * (w - k) + inputs.slot_mapping[real].tolist()
    assert got["seq_lens"][:3].tolist() == seq_lens
    assert torch.equal(got["block_tables"][:3, :2], torch.from_numpy(inputs.block_tables))
    # graph token indices of the logit rows: request 0's four, request 1's last, request 2's last two
    assert logits[:, 0].tolist() == [0, 1, 2, 3, 7, 10, 11]


def test_verification_graphs_refuse_a_width_of_one():
    from carpool.attention.triton_paged import TritonAttentionBackend

    model = SimpleNamespace(attention_layers=lambda: [SimpleNamespace(num_kv_heads=2)])
    with pytest.raises(ValueError, match="^verify_widths:"):
        CUDAGraphRunner(model, TritonAttentionBackend(), 4, 512, 8, torch.device(DEVICE),  # type: ignore[arg-type]
                        verify_widths=(1, 3), verify_max_num_seqs=4)


# ---- whole engines, graph replays stood in for on CPU -----------------------------------------------------

@pytest.fixture
def stand_in_graphs(monkeypatch):
    return install_stand_in_graphs(monkeypatch)


def install_stand_in_graphs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[CUDAGraphRunner, GraphShape, int]]:
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
    batch of 4) beside a penalized one that never speculates (its decodes padded into the same graphs); the
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


# ---- n-gram speculation in batches mixing query widths ----------------------------------------------------

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 3}


def ngram_workload() -> list[list[int]]:
    """Prompts repeating a segment beside random ones: some requests find n-gram matches and verify
    1 to 3 proposed tokens while others find none and decode one token, in the same steps."""
    from checkpoints import prompts_of_lengths

    seg = prompts_of_lengths([10, 8], seed=4)
    rnd = prompts_of_lengths([9, 12], seed=5)
    return [seg[0] * 3, rnd[0], seg[1] * 2 + rnd[1][:3], rnd[1]]


@dataclasses.dataclass(frozen=True)
class TargetStep:
    widths: tuple[int, ...]  # query tokens of each request
    num_drafts: int  # proposed tokens the step verifies, all requests together
    shape: GraphShape | None  # the graph it replayed (None: eager)


def run_with_stand_in_graphs(llama_path: str, params: list, speculative_config: dict | None = NGRAM
                             ) -> tuple[list[list[int]], list[TargetStep], object]:
    """(tokens per request, the target's steps, engine stats) of ngram_workload() on an engine whose graph
    replays are stood in for (install_stand_in_graphs), speculating by `speculative_config`."""
    from carpool import LLM
    from carpool.worker import model_runner

    steps: list[TargetStep] = []
    with pytest.MonkeyPatch.context() as mp:
        replays = install_stand_in_graphs(mp)
        real_forward = model_runner.ModelRunner._forward

        def forward(self, inputs, fixup, keep_hidden=False):
            first = len(replays)
            out = real_forward(self, inputs, fixup, keep_hidden)
            shapes = [s for r, s, _ in replays[first:] if r is self.graph_runner]
            steps.append(TargetStep(tuple(np.diff(inputs.query_start_loc).tolist()),
                                    0 if inputs.num_drafts is None else int(inputs.num_drafts.sum()),
                                    shapes[0] if shapes else None))
            return out

        mp.setattr(model_runner.ModelRunner, "_forward", forward)
        llm = LLM(llama_path, device="cpu", kernel_backend="triton", max_num_seqs=8,
                  speculative_config=speculative_config)
        outs = llm.generate([{"prompt_token_ids": p} for p in ngram_workload()], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], steps, llm.engine.stats()


def greedy_params() -> list:
    from carpool import SamplingParams

    return [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)] * len(ngram_workload())


@pytest.fixture(scope="module")
def greedy_ngram_run(llama_path):
    return run_with_stand_in_graphs(llama_path, greedy_params())


@interpreter_only
def test_greedy_ngram_speculation_in_graphed_mixed_batches_equals_greedy_without(greedy_ngram_run, llama_path):
    from carpool import LLM

    tokens, _, _ = greedy_ngram_run
    plain = LLM(llama_path, device="cpu").generate([{"prompt_token_ids": p} for p in ngram_workload()],
                                                   greedy_params(), use_tqdm=False)
    assert tokens == [o.outputs[0].token_ids for o in plain]


@interpreter_only
def test_verifications_mixing_query_widths_replay_the_graph_of_their_widest_request(greedy_ngram_run):
    """Every verification step (after the prefill, none mixes with a prompt) replays a graph of its
    widest request's width, those mixing speculating and plain requests or proposals of different
    lengths included."""
    _, steps, _ = greedy_ngram_run
    verifying = [s for s in steps if s.num_drafts]
    assert any(len(set(s.widths)) > 1 and min(s.widths) == 1 for s in verifying)
    assert all(s.shape is not None and s.shape.query_len == max(s.widths) >= 2 for s in verifying), verifying


@interpreter_only
def test_acceptance_metrics_count_proposed_tokens_not_graph_padding(greedy_ngram_run):
    """Graphed verifications compute W query tokens for every request; the metrics count only the tokens
    the proposer proposed (padding is never a proposal) and those of them the target accepted."""
    _, steps, stats = greedy_ngram_run
    verifying = [s for s in steps if s.num_drafts]
    padded = sum(len(s.widths) * (max(s.widths) - 1) for s in verifying)
    assert stats.spec_decode_num_draft_tokens == sum(s.num_drafts for s in verifying) < padded
    assert 0 < stats.spec_decode_num_accepted_tokens <= stats.spec_decode_num_draft_tokens


@interpreter_only
def test_seeded_sampling_with_graphed_mixed_verifications_draws_the_plain_engines_tokens(llama_path):
    """Each request with its own seed samples the same tokens with n-gram speculation (its verifications
    replayed in mixed-width graphs) as a plain engine does. (Top-2 sampling: random enough that seeds
    matter, repetitive enough that n-gram lookup finds matches.)"""
    from carpool import SamplingParams

    params = [SamplingParams(temperature=0.3, top_k=2, seed=seed, max_tokens=10, ignore_eos=True)
              for seed in (3, 5, 7, 9)]
    tokens, steps, stats = run_with_stand_in_graphs(llama_path, params)
    plain_tokens, _, _ = run_with_stand_in_graphs(llama_path, params, None)
    assert tokens == plain_tokens
    assert any(s.num_drafts and len(set(s.widths)) > 1 and s.shape is not None for s in steps)
    assert stats.spec_decode_num_accepted_tokens > 0
