"""Speculative decoding in the scheduler, without a model: proposed tokens are scheduled inside the token
budget, rejected ones roll num_computed_tokens back and free their blocks, block hashes never cover an
unverified token, and stops inside an accepted run end the request there. A fake greedy "target"
(next token = a function of the last one) stands in for the model."""

from __future__ import annotations

import random

from carpool.config import SchedulerConfig, SpeculativeConfig
from carpool.core.block_pool import hash_block_tokens
from carpool.core.kv_cache_manager import KVCacheManager
from carpool.core.sched_output import ModelRunnerOutput, SchedulerOutput
from carpool.core.scheduler import Scheduler
from carpool.request import Request, RequestStatus
from carpool.sampling_params import SamplingParams

NGRAM = SpeculativeConfig("ngram", 3, prompt_lookup_min=1, prompt_lookup_max=2, disable_by_batch_size=None)


def make(spec: SpeculativeConfig | None = NGRAM, num_blocks: int = 64, block_size: int = 4, budget: int = 64,
         max_seqs: int = 8, max_len: int = 256, caching: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_caching=caching, hash_seed=b"s")
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len),
                     kv, spec)


def req(rid: str, prompt: list[int], max_tokens: int = 10, **kw) -> Request:
    return Request(rid, list(prompt), SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw))


def target_next(token: int) -> int:
    """The fake model's greedy choice after `token`."""
    return (token * 7 + 3) % 61 + 1


def targets(last: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        last = target_next(last)
        out.append(last)
    return out


def step(s: Scheduler, propose=None) -> tuple[SchedulerOutput, list]:
    """One schedule/update cycle: sampling requests verify their scheduled proposals against the fake
    target (longest agreeing prefix + the target's own token); `propose(request, context)` gives the next
    proposal (default: none)."""
    so = s.schedule()
    req_ids, tokens, spec = [], [], {}
    for rid in so.num_scheduled_tokens:
        r = s.requests[rid]
        if not r.num_output_placeholders:
            continue  # a prefill chunk that does not reach the end
        context = r.prompt_token_ids + r.output_token_ids
        emitted = []
        for draft in so.scheduled_spec_decode_tokens.get(rid, []):
            emitted.append(target_next((context + emitted)[-1]))
            if emitted[-1] != draft:
                break
        else:
            emitted.append(target_next((context + emitted)[-1]))
        req_ids += [rid] * len(emitted)
        tokens += emitted
        if propose is not None:
            spec[rid] = propose(r, context + emitted)
    out = s.update_from_output(so, ModelRunnerOutput(req_ids, tokens, [None] * len(tokens), spec_token_ids=spec))
    s.check_integrity()
    return so, out


def oracle(wrong_at: int | None = None, k: int = 3):
    """Proposes the target's next k tokens, with position `wrong_at` replaced by a token it rejects."""
    def propose(request: Request, context: list[int]) -> list[int]:
        guess = targets(context[-1], k)
        if wrong_at is not None:
            guess[wrong_at] = guess[wrong_at] % 61 + 62
        return guess
    return propose


def run_to_end(s: Scheduler, propose=None) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(500):
        if not s.has_unfinished_requests():
            break
        _, out = step(s, propose)
        for o in out:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert not s.has_unfinished_requests()
    s.kv.check_integrity(live_request_ids=[])
    return tokens


def test_proposed_tokens_are_scheduled_after_the_known_tokens_within_the_budget():
    s = make(budget=3)
    s.add_request(req("a", [5, 6]))
    step(s, oracle())  # prefill (2 tokens), then a proposal of 3
    so, _ = step(s)
    # 1 known token + 3 proposed ones would need 4; the budget of 3 keeps the first 2 proposed
    assert so.num_scheduled_tokens == {"a": 3}
    assert so.scheduled_spec_decode_tokens == {"a": targets(target_next(6), 2)}


def test_rejected_tokens_roll_num_computed_back():
    s = make(block_size=4, caching=False)
    s.add_request(req("a", [1, 2, 3]))
    step(s, oracle(wrong_at=1))  # prefill: 4 known tokens; proposal: right, wrong, right
    request = s.requests["a"]
    so, out = step(s)
    assert so.num_scheduled_tokens == {"a": 4}  # the 4th known token + 3 proposed
    assert len(out[0].new_token_ids) == 2  # the accepted one + the target's own in place of the wrong one
    assert request.num_computed_tokens == 5 and request.num_tokens == 6


def test_blocks_only_rejected_tokens_used_are_freed_and_the_runner_is_told():
    s = make(block_size=4, caching=False)
    s.add_request(req("b", [1, 2, 3, 4, 5, 6]))
    step(s, oracle(wrong_at=0))  # 7 known tokens
    so, _ = step(s)  # positions 6..9 scheduled (a third block for 8, 9); all 3 proposed rejected
    assert len(so.cached_reqs[0].new_block_ids) == 1
    assert len(s.kv.block_ids("b")) == 2  # 8 known tokens need 2 blocks: the third is free again
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks - 2
    so, _ = step(s)
    assert so.cached_reqs[0].num_blocks_kept == 2  # the runner cuts its table before appending
    so, _ = step(s)
    assert so.cached_reqs[0].num_blocks_kept is None  # nothing freed since the runner last heard


def test_no_cached_block_hash_covers_an_unverified_token():
    s = make(block_size=4, caching=True)
    s.add_request(req("a", [9, 8, 7, 6, 5, 4], max_tokens=4))
    step(s, oracle(wrong_at=0))  # 7 known tokens; proposal rejected at its first token
    unverified = s.requests["a"].spec_token_ids[0]
    step(s)  # positions 6..9: block 1 (positions 4..7) holds the proposal at 7 while the step runs
    request = s.requests["a"]
    verified = request.prompt_token_ids + request.output_token_ids
    assert len(verified) == 8 and verified[7] != unverified
    assert hash_block_tokens(request.block_hashes[0], verified[4:7] + [unverified]) not in s.kv.pool.cached_blocks
    # b's prompt continues as the rejected proposal did: only block 0 may be a hit; c's, as verified: both
    s.add_request(req("b", verified[:7] + [unverified, 1]))
    s.add_request(req("c", verified + [1]))
    so, _ = step(s)
    computed = {n.req_id: n.num_computed_tokens for n in so.new_reqs}
    assert computed == {"b": 4, "c": 8}


def test_stop_token_inside_an_accepted_run_ends_the_request_there():
    s = make()
    s.add_request(req("a", [1, 2], max_tokens=10))
    after = targets(2, 4)
    s.requests["a"].sampling_params.stop_token_ids = [after[2]]  # the third token of an all-accepted run
    step(s, oracle())
    _, out = step(s, oracle())
    assert out[0].new_token_ids == after[1:3] and out[0].finish_reason == "stop"
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks


def test_eos_inside_an_accepted_run_ends_the_request_there():
    s = make()
    after = targets(2, 4)
    s.add_request(req("a", [1, 2], max_tokens=10, eos_token_ids=(after[2],)))  # the third token of the run
    step(s, oracle())
    _, out = step(s, oracle())
    assert out[0].new_token_ids == after[1:3] and out[0].finish_reason == "stop"
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks


def test_a_stop_token_before_min_tokens_inside_an_accepted_run_does_not_end_it():
    s = make()
    after = targets(2, 5)  # prefill emits after[0]; the verification after[1:4] and the target's after[4]
    s.add_request(req("a", [1, 2], max_tokens=10, min_tokens=4, stop_token_ids=[after[2]]))
    step(s, oracle())
    _, out = step(s, oracle())  # the stop token is output 3 of at least 4: the run goes on past it
    assert out[0].new_token_ids == after[1:] and out[0].finish_reason is None


def test_a_request_aborted_while_verifying_drops_its_tokens_and_frees_its_blocks():
    s = make(block_size=4, caching=False)
    s.add_request(req("a", [1, 2, 3]))
    s.add_request(req("b", [4, 5, 6]))
    step(s, oracle())
    so = s.schedule()
    assert set(so.scheduled_spec_decode_tokens) == {"a", "b"}
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    context = s.requests["b"].prompt_token_ids + s.requests["b"].output_token_ids
    emitted = targets(context[-1], 4)  # both verify all 3 proposed tokens; a's are dropped
    out = s.update_from_output(so, ModelRunnerOutput(["a"] * 4 + ["b"] * 4, emitted + emitted, [None] * 8))
    assert [o.request_id for o in out] == ["b"] and out[0].new_token_ids == emitted
    assert s.spec_stats.num_drafts == 1  # only b's verification counts
    s.check_integrity()
    assert s.kv.pool.num_free_blocks == s.kv.num_blocks - len(s.kv.block_ids("b"))
    assert "a" in s.schedule().finished_req_ids  # the runner frees a's row (and the proposer forgets it)


def test_proposals_never_reach_past_max_tokens():
    s = make()
    s.add_request(req("a", [1, 2], max_tokens=3))
    step(s, oracle())  # 1 output: 2 to go, so at most 1 proposed token (+ the target's own)
    so, out = step(s, oracle())
    assert so.scheduled_spec_decode_tokens == {"a": [targets(2, 2)[1]]}
    assert out[0].finish_reason == "length"


def test_speculation_is_off_for_steps_at_disable_by_batch_size_running_requests():
    spec = SpeculativeConfig("ngram", 3, prompt_lookup_min=1, prompt_lookup_max=2, disable_by_batch_size=2)
    s = make(spec)
    s.add_request(req("a", [1, 2]))
    step(s, oracle())
    so, _ = step(s, oracle())
    assert so.scheduled_spec_decode_tokens  # one running request: on
    s.add_request(req("b", [3, 4]))
    step(s, oracle())  # admits b; a verifies (the step started with one running request)
    assert not s.speculation_on()
    so, _ = step(s, oracle())
    assert not so.scheduled_spec_decode_tokens and set(so.num_scheduled_tokens.values()) == {1}


def test_requests_with_penalties_do_not_verify_proposals():
    s = make()
    s.add_request(req("a", [1, 2], repetition_penalty=1.2))
    step(s, oracle())
    so, _ = step(s, oracle())
    assert not so.scheduled_spec_decode_tokens and so.num_scheduled_tokens == {"a": 1}


def test_acceptance_is_counted_per_position():
    s = make()
    s.add_request(req("a", [1, 2], max_tokens=30))
    step(s, oracle(wrong_at=2))
    for _ in range(3):
        step(s, oracle(wrong_at=2))
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 9, 6)
    assert stats.num_accepted_tokens_per_pos == [3, 3, 0]
    assert stats.acceptance_rate == 6 / 9 and stats.mean_accepted_length == 2.0


def test_a_draft_model_gets_lookahead_slots_within_max_model_len():
    spec = SpeculativeConfig("draft_model", 4, model="/draft", disable_by_batch_size=None)
    s = make(spec, block_size=4, max_len=12)
    s.add_request(req("a", [1, 2, 3], max_tokens=9))
    step(s)
    assert len(s.kv.block_ids("a")) == 2  # 3 prompt tokens + 4 slots for the draft's own K/V
    for _ in range(4):
        step(s)
    assert len(s.kv.block_ids("a")) == 3  # capped at max_model_len = 12 positions


def test_outputs_and_block_accounting_match_plain_decoding_under_pressure():
    """Chunked prefill, prefix hits, preemption and random proposals (each position right with
    probability 0.6): every request's tokens equal those of the same run without speculation, and the
    block accounting holds after every step (step() checks it)."""
    rng = random.Random(0)

    def noisy(request: Request, context: list[int]) -> list[int]:
        guess = targets(context[-1], 3)
        return [t if rng.random() < 0.6 else t + 62 for t in guess]

    shared = list(range(1, 14))
    prompts = {f"r{i}": shared[:3 + 2 * i] + [50 + i] * (i % 3) for i in range(6)}
    results = []
    for spec, propose in ((None, None), (NGRAM, noisy)):
        s = make(spec, num_blocks=14, block_size=4, budget=12, caching=True)
        for rid, prompt in prompts.items():
            s.add_request(req(rid, prompt, max_tokens=9 + len(rid)))
        results.append(run_to_end(s, propose))
        if spec is not None:
            assert s.num_preemptions > 0 and s.kv.prefix_stats.hits > 0
            assert 0 < s.spec_stats.num_accepted_tokens < s.spec_stats.num_draft_tokens
    assert results[0] == results[1]
