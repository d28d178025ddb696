"""Async scheduling: step N+1 is scheduled and launched before step N's tokens reach the host. Every
observable result must equal the synchronous engine's; finishes are simply noticed one step later."""

from __future__ import annotations

import pytest
from checkpoints import prompts_of_lengths

from carpool import LLM, Engine, EngineArgs, SamplingParams


@pytest.fixture(scope="module")
def pair(llama_path) -> tuple[LLM, LLM]:
    return (LLM(llama_path, device="cpu", async_scheduling=False),
            LLM(llama_path, device="cpu", async_scheduling=True))


PROMPTS = prompts_of_lengths([3, 9, 20, 40, 7, 64])

CASES = {
    "seeded": SamplingParams(temperature=1.0, seed=42, max_tokens=12, ignore_eos=True),
    "top_k_top_p": SamplingParams(temperature=0.8, seed=7, top_k=20, top_p=0.9, max_tokens=12, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5, max_tokens=12,
                                ignore_eos=True),
    "min_tokens": SamplingParams(temperature=0.0, min_tokens=5, max_tokens=9),
    "logprobs": SamplingParams(temperature=0.0, logprobs=2, max_tokens=6, ignore_eos=True),
    "n": SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_async_results_equal_sync_results(pair, case):
    sync, asy = pair
    params = CASES[case]
    a = sync.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    b = asy.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
        assert [c.finish_reason for c in x.outputs] == [c.finish_reason for c in y.outputs]
        if params.logprobs is not None:
            assert [lp.keys() for lp in x.outputs[0].logprobs] == [lp.keys() for lp in y.outputs[0].logprobs]


def test_stop_token_and_stop_string_finish_identically(pair):
    sync, asy = pair
    greedy = sync.generate("abc", SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    stop_tok = greedy.token_ids[4]
    text = greedy.text
    stop_str = next(text[i:i + 2] for i in range(3, len(text) - 1) if "\ufffd" not in text[i:i + 2])
    for params in (SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok], ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=16, stop=[stop_str], ignore_eos=True)):
        x = sync.generate("abc", params, use_tqdm=False)[0].outputs[0]
        y = asy.generate("abc", params, use_tqdm=False)[0].outputs[0]
        assert (x.text, x.token_ids, x.finish_reason, x.stop_reason) == (y.text, y.token_ids, y.finish_reason,
                                                                          y.stop_reason)
        assert y.finish_reason == "stop"


def test_block_accounting_holds_with_steps_in_flight(llama_path):
    engine = Engine.from_engine_args(EngineArgs(model=llama_path, device="cpu", num_kv_blocks=18,
                                                max_num_batched_tokens=40, async_scheduling=True))
    for i, p in enumerate(prompts_of_lengths([5, 40, 90, 120, 17, 64, 33])):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.7, seed=i, max_tokens=15, ignore_eos=True))
    finished = set()
    steps = 0
    while engine.has_unfinished_requests():
        finished |= {o.request_id for o in engine.step() if o.finished}
        engine.core.scheduler.check_integrity()
        steps += 1
        if steps == 6:
            engine.abort("r3")
    assert finished == {f"r{i}" for i in range(7)} - {"r3"}
    assert engine.stats().num_preemptions > 0
    engine.core.kv_cache_manager.check_integrity(live_request_ids=[])
    assert engine.core.kv_cache_manager.pool.num_free_blocks == 18
    runner = engine.core.executor.runner
    assert len(runner.input_batch) == 0 or not engine.core.scheduler.requests


def test_penalized_requests_are_counted_through_preemption_abort_and_finish(llama_path):
    """The core asks every step whether a running request uses penalties (they stop steps overlapping); the
    scheduler counts them as requests enter and leave `running` (check_integrity compares with a scan)."""
    engine = Engine.from_engine_args(EngineArgs(model=llama_path, device="cpu", num_kv_blocks=18,
                                                max_num_batched_tokens=40, async_scheduling=True))
    scheduler = engine.core.scheduler
    penalized = {"r1", "r3", "r4"}  # r3 is preempted, r4 aborted
    for i, p in enumerate(prompts_of_lengths([5, 40, 90, 120, 17, 64, 33])):
        extra = {"repetition_penalty": 1.3} if f"r{i}" in penalized else {}
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.7, seed=i, max_tokens=15, ignore_eos=True,
                                                      **extra))
    seen_overlap_blocked = False
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        scheduler.check_integrity()
        running = {r.request_id for r in scheduler.running}
        assert scheduler.running_has_penalties() == bool(running & penalized)
        seen_overlap_blocked |= scheduler.running_has_penalties() and not engine.core._can_overlap()
        steps += 1
        if steps == 6:
            engine.abort("r4")
    assert engine.stats().num_preemptions > 0
    assert seen_overlap_blocked and not scheduler.running_has_penalties()
