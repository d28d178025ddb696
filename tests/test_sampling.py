"""Sampling behaviour through the real engine on a tiny checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import prompts_of_lengths

from carpool import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(llama_path) -> LLM:
    return LLM(llama_path, device="cpu")


PROMPTS = prompts_of_lengths([3, 9, 20, 40, 7])


def tokens(llm: LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_request_gives_the_same_tokens_alone_and_inside_a_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tokens(llm, [PROMPTS[2]], seeded)[0]
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                         [others, others, seeded, others, others], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    again = tokens(llm, [PROMPTS[2]], seeded)[0]
    assert again == alone


def test_different_seeds_give_different_tokens(llm):
    a = tokens(llm, [PROMPTS[1]], SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True))
    b = tokens(llm, [PROMPTS[1]], SamplingParams(temperature=1.0, seed=2, max_tokens=16, ignore_eos=True))
    assert a != b


def test_top_k_1_equals_greedy(llm):
    greedy = tokens(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    top1 = tokens(llm, PROMPTS, SamplingParams(temperature=0.9, top_k=1, max_tokens=10, ignore_eos=True))
    assert top1 == greedy


def test_tiny_top_p_equals_greedy(llm):
    greedy = tokens(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    nucleus = tokens(llm, PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, ignore_eos=True))
    assert nucleus == greedy


def test_max_tokens_finishes_with_length(llm):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    for o in outs:
        assert len(o.outputs[0].token_ids) == 5 and o.outputs[0].finish_reason == "length"


def test_stop_token_ids_finish_with_stop(llm):
    greedy = tokens(llm, [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    stop_tok = greedy[3]
    first = greedy.index(stop_tok)
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                       SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_tok], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_stop_string_ends_the_request_and_is_cut_from_the_text(llm):
    prompt = "hello world, this is a test"
    full = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = full.text
    # a stop string made of two consecutive generated characters, spanning a token boundary
    stop = next(text[i:i + 2] for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    cut = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    kept = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop],
                                               include_stop_str_in_output=True, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_eos_ends_the_request_unless_ignored(llm):
    greedy = tokens(llm, [PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    eos = greedy[2]
    llm.engine.eos_token_ids = (eos,)
    try:
        out = llm.generate([{"prompt_token_ids": PROMPTS[3]}], SamplingParams(temperature=0.0, max_tokens=8),
                           use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.token_ids[-1] == eos and len(out.token_ids) <= 3
        minimum = llm.generate([{"prompt_token_ids": PROMPTS[3]}],
                               SamplingParams(temperature=0.0, max_tokens=8, min_tokens=6), use_tqdm=False)[0]
        assert len(minimum.outputs[0].token_ids) >= 6
        assert eos not in minimum.outputs[0].token_ids[:6]
    finally:
        llm.engine.eos_token_ids = ()


def test_logprobs_hold_the_sampled_token_and_top_n(llm):
    out = llm.generate([{"prompt_token_ids": PROMPTS[1]}],
                       SamplingParams(temperature=0.0, max_tokens=4, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    total = 0.0
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1  # greedy picks the most likely token
        assert 3 <= len(entry) <= 4
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked][:3] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:]))
        total += entry[tok].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


def test_n_returns_n_distinct_samples(llm):
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}],
                       SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


def test_repetition_penalty_changes_greedy_output(llm):
    plain = tokens(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    penalized = tokens(llm, PROMPTS, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                    repetition_penalty=2.0, frequency_penalty=1.0))
    assert plain != penalized
    # a strong frequency penalty discourages repeats
    repeats = lambda ts: sum(len(t) - len(set(t)) for t in ts)  # noqa: E731
    assert repeats(penalized) < repeats(plain)


def test_outputs_come_back_in_input_order(llm):
    prompts = ["a", "bb", "ccc", "dddd"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert len({o.request_id for o in outs}) == 4


def test_apply_penalties_matches_a_per_row_reference():
    """Repetition over prompt and output ids, frequency and presence over output ids; repeated ids
    count, and a row may have no output yet."""
    from carpool.layers.sampler import SamplingMetadata, apply_penalties

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, generator=gen)
    prompts, outputs = [[1, 2, 2], [0], [5, 7]], [[3, 3, 1], [], [7, 10, 10, 10]]
    rep, freq, pres = torch.tensor([2.0, 1.5, 1.2]), torch.tensor([0.5, 0.0, 0.3]), torch.tensor([1.0, 0.2, 0.0])
    md = SamplingMetadata(temperature=torch.ones(3), all_greedy=False, presence_penalty=pres, frequency_penalty=freq,
                          repetition_penalty=rep, prompt_token_ids=prompts, output_token_ids=outputs)
    expected = logits.clone()
    for r in range(3):
        for t in set(prompts[r]) | set(outputs[r]):
            x = expected[r, t]
            expected[r, t] = x / rep[r] if x > 0 else x * rep[r]
        for t in set(outputs[r]):
            expected[r, t] -= freq[r] * outputs[r].count(t) + pres[r]
    torch.testing.assert_close(apply_penalties(logits, md), expected)


def test_banned_ids_are_masked_in_their_own_rows_only():
    from carpool.layers.sampler import Sampler, SamplingMetadata

    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]] * 3)
    md = SamplingMetadata(temperature=torch.zeros(3), all_greedy=True, num_logprobs=[None] * 3,
                          banned_token_ids={0: [1], 2: [1, 2]})
    sampled, _ = Sampler()(logits, md)
    assert sampled.tolist() == [2, 1, 3]
