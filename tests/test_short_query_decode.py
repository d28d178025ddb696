"""Short queries as decode rows (KernelConfig.short_query_decode, attention/triton_paged.py): a step whose
requests have 2-16 query tokens (a verification, a draft's catch-up) runs attention as split-K decode with
one row per query token, over the token's own causal context. The Triton kernels run in the interpreter;
the reference is torch's paged attention over the step as it was scheduled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from triton_cases import DEVICE, interpreter_only, make_batch  # noqa: E402

from carpool.attention.triton_paged import SHORT_QUERY_MAX, TritonAttentionBackend, as_decode_rows  # noqa: E402
from carpool.ops import torch_ref  # noqa: E402
from carpool.ops import triton as tri  # noqa: E402
from carpool.worker.input_batch import StepInputs  # noqa: E402


def step_inputs(reqs: list[tuple[int, int]], block_tables: np.ndarray, slots: np.ndarray) -> StepInputs:
    """The host arrays of a step of requests given as (seq_len, q_len)."""
    qsl = np.concatenate([[0], np.cumsum([q for _, q in reqs])]).astype(np.int32)
    positions = np.concatenate([np.arange(s - q, s) for s, q in reqs]).astype(np.int64)
    rows = np.arange(len(reqs))
    return StepInputs(rows=rows, input_ids=np.zeros(len(positions), dtype=np.int64), positions=positions,
                      slot_mapping=slots, query_start_loc=qsl,
                      seq_lens=np.array([s for s, _ in reqs], dtype=np.int32), block_tables=block_tables,
                      sample_rows=rows, logits_indices=qsl[1:] - 1, max_query_len=max(q for _, q in reqs),
                      max_seq_len=max(s for s, _ in reqs), pending_token_index=np.zeros(0, dtype=np.int64),
                      pending_rows=np.zeros(0, dtype=np.int64))


def test_decode_rows_give_each_query_token_its_causal_context() -> None:
    tables = np.array([[7, 3, 0], [1, 2, 5]], dtype=np.int32)
    inputs = step_inputs([(40, 3), (35, 1)], tables, np.arange(4))
    rows = as_decode_rows(inputs)
    assert rows.query_start_loc.tolist() == [0, 1, 2, 3, 4] and rows.max_query_len == 1
    assert rows.seq_lens.tolist() == [38, 39, 40, 35]  # token at position p reads keys 0 .. p
    assert rows.block_tables.tolist() == [[7, 3, 0]] * 3 + [[1, 2, 5]]
    for name in ("input_ids", "positions", "slot_mapping", "logits_indices"):
        assert np.array_equal(getattr(rows, name), getattr(inputs, name)), name


@pytest.mark.parametrize("reqs", [[(120, 5), (33, 2), (260, 1), (64, 3)], [(9, 4)], [(700, 16), (17, 16)]])
def test_short_queries_as_decode_rows_match_the_reference_attention(reqs: list[tuple[int, int]]) -> None:
    q, k, v, kc, vc, meta = make_batch(reqs, 4, 2, 32, 16, torch.float32)
    expected = torch_ref.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.3)
    inputs = step_inputs(reqs, meta.block_tables.cpu().numpy(), meta.slot_mapping.cpu().numpy())
    rows_meta = TritonAttentionBackend(short_query_decode=True).build_metadata(inputs, torch.device(DEVICE))
    assert rows_meta.max_query_len == 1 and rows_meta.seq_lens.shape[0] == len(q)
    out = tri.paged_attention(q, k, v, kc, vc, rows_meta, 0.3)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_only_steps_of_2_to_16_query_tokens_become_decode_rows() -> None:
    backend = TritonAttentionBackend(short_query_decode=True)
    assert [backend.decode_rows(w) for w in (1, 2, SHORT_QUERY_MAX, SHORT_QUERY_MAX + 1)] == [False, True, True,
                                                                                              False]
    assert not TritonAttentionBackend().decode_rows(4)  # off by default


@interpreter_only
def test_greedy_speculation_with_short_query_decode_equals_greedy_without(llama_path, tmp_path, monkeypatch) -> None:
    """A draft model (its catch-ups, and every verification, as decode rows) and n-gram lookup, on the
    Triton kernels without graphs: greedy's tokens; the prefill kernel runs for prompts only."""
    from checkpoints import prompts_of_lengths
    from test_spec_decode import smaller_draft

    from carpool import LLM, SamplingParams
    from carpool.ops.triton import attention as tri_attention

    seg = prompts_of_lengths([12], seed=4)[0]
    prompts = [{"prompt_token_ids": p} for p in (seg * 3, *prompts_of_lengths([9, 14], seed=5))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in LLM(llama_path, device="cpu").generate(prompts, params,
                                                                                          use_tqdm=False)]
    prefill_queries: list[int] = []
    real_prefill = tri_attention.prefill_attention

    def prefill(q, *args, **kwargs):
        prefill_queries.append(q.shape[0])
        return real_prefill(q, *args, **kwargs)

    monkeypatch.setattr(tri_attention, "prefill_attention", prefill)
    specs = [{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 3},
             {"method": "draft_model", "model": smaller_draft(llama_path, str(tmp_path / "draft")),
              "num_speculative_tokens": 3}]
    for spec in specs:
        prefill_queries.clear()
        llm = LLM(llama_path, device="cpu", kernel_backend="triton", enforce_eager=True, short_query_decode=True,
                  speculative_config=spec)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == reference, spec["method"]
        assert llm.engine.stats().spec_decode_num_accepted_tokens > 0, spec["method"]
        # every prefill-kernel call was a step with a prompt (> 16 tokens); no verification reached it
        assert prefill_queries and min(prefill_queries) > SHORT_QUERY_MAX, (spec["method"], prefill_queries)


@interpreter_only
def test_graphed_verifications_and_catch_ups_as_decode_rows_give_greedy_tokens(llama_path, tmp_path, monkeypatch):
    """Stand-in graph replays (test_spec_decode_graphs): verification graphs of W tokens per request are
    captured over bs * W decode rows, padded requests and narrower ones included, for the target and for
    the draft's catch-ups; greedy output is greedy's without speculation."""
    from checkpoints import prompts_of_lengths
    from test_spec_decode import smaller_draft
    from test_spec_decode_graphs import install_stand_in_graphs

    from carpool import LLM, SamplingParams

    prompts = [{"prompt_token_ids": p} for p in prompts_of_lengths([6, 11, 9], seed=1)]
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in LLM(llama_path, device="cpu").generate(prompts, params,
                                                                                          use_tqdm=False)]
    replays = install_stand_in_graphs(monkeypatch)
    spec = {"method": "draft_model", "model": smaller_draft(llama_path, str(tmp_path / "draft")),
            "num_speculative_tokens": 2}
    llm = LLM(llama_path, device="cpu", kernel_backend="triton", max_num_seqs=8, block_size=8,
              short_query_decode=True, speculative_config=spec)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference
    runner = llm.engine.core.executor.runner  # type: ignore[attr-defined]
    for graphs in (runner.graph_runner, runner.proposer.graph_runner):
        replayed = {s for r, s, _ in replays if r is graphs and s.query_len > 1}
        assert replayed, "no verification-shaped replay"
        for shape in replayed:
            attn = graphs.batches[shape].attn
            assert attn.max_query_len == 1 and attn.num_reqs == shape.num_tokens, shape
    assert llm.engine.stats().spec_decode_num_accepted_tokens > 0
