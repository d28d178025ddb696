"""Automatic prefix caching through the engine: same tokens with caching on and off, hit lengths,
LRU eviction under memory pressure, reset."""

from __future__ import annotations

import pytest
from checkpoints import prompts_of_lengths

from carpool import LLM, Engine, EngineArgs, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
BS = 16


def shared_prefix_prompts() -> list[list[int]]:
    base = prompts_of_lengths([120], seed=5)[0]
    tails = prompts_of_lengths([7, 3, 20, 1, 33], seed=6)
    return [
        base[:10] + tails[0],  # prefix inside the first block
        base[:10] + tails[1],
        base[:32] + tails[2],  # prefix exactly on a block boundary
        base[:32] + tails[3],
        base[:75] + tails[4],  # prefix ending mid-block
        base[:75] + tails[0],
        base,  # whole prompt identical
        base,
        list(base),
    ]


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("engine_args", [
    dict(),
    dict(max_num_batched_tokens=24),
    dict(num_kv_blocks=14, max_num_batched_tokens=40),
], ids=["default", "chunked", "preemption"])
def test_greedy_output_is_identical_with_caching_on_and_off(llama_path, engine_args):
    prompts = shared_prefix_prompts()
    off = LLM(llama_path, device="cpu", enable_prefix_caching=False, **engine_args)
    on = LLM(llama_path, device="cpu", enable_prefix_caching=True, **engine_args)
    expected = generate(off, prompts)
    # twice: the second round hits blocks cached by the first
    assert generate(on, prompts) == expected
    assert generate(on, prompts) == expected
    assert on.engine.stats().prefix_cache_hits > 0
    if "num_kv_blocks" in engine_args:
        assert on.engine.stats().num_preemptions > 0


def test_second_identical_request_reuses_the_full_block_part_of_its_prompt(llama_path):
    llm = LLM(llama_path, device="cpu")
    prompt = prompts_of_lengths([70], seed=9)[0]  # 4 full blocks + 6 tokens
    first = llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0]
    second = llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    shares_first_block = prompt[:BS] + prompts_of_lengths([30], seed=10)[0]
    third = llm.generate([{"prompt_token_ids": shares_first_block}], GREEDY, use_tqdm=False)[0]
    assert third.num_cached_tokens == BS


def test_block_aligned_identical_prompt_recomputes_its_last_block(llama_path):
    llm = LLM(llama_path, device="cpu")
    prompt = prompts_of_lengths([48], seed=11)[0]
    llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
    again = llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 32  # the last token must be computed to get logits


def test_caching_off_reports_no_hits(llama_path):
    llm = LLM(llama_path, device="cpu", enable_prefix_caching=False)
    prompt = prompts_of_lengths([40], seed=12)[0]
    outs = llm.generate([{"prompt_token_ids": prompt}] * 2, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert llm.engine.stats().prefix_cache_hits == 0


def test_cached_blocks_are_evicted_lru_first_and_never_block_admission(llama_path):
    engine = Engine.from_engine_args(EngineArgs(model=llama_path, device="cpu", num_kv_blocks=12))
    prompts = prompts_of_lengths([40, 40, 40, 40, 40, 40], seed=13)  # 3 blocks each, 4 with output
    for i, p in enumerate(prompts):  # one at a time: each leaves 3 cached blocks behind
        engine.add_request(f"r{i}", p, GREEDY)
        while engine.has_unfinished_requests():
            engine.step()
            engine.core.scheduler.check_integrity()
    pool = engine.core.kv_cache_manager.pool
    assert pool.num_free_blocks == 12  # cached-but-free blocks count as free
    assert pool.num_evictions > 0  # 6 x 3 cached blocks cannot all stay in 12
    kv = engine.core.kv_cache_manager

    def hit(i: int) -> int:
        from carpool.request import Request

        return kv.get_computed_blocks(Request(f"probe{i}", prompts[i], GREEDY))[1]

    assert hit(0) == 0  # the oldest prompt was evicted first
    assert hit(5) == 32  # the newest is still cached (2 full prompt blocks of 40 tokens)
    # a request needing every block is admitted by evicting cached blocks
    engine.add_request("big", prompts_of_lengths([180], seed=14)[0], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
        engine.core.scheduler.check_integrity()
    kv.check_integrity(live_request_ids=[])


def test_reset_prefix_cache_forgets_cached_blocks(llama_path):
    llm = LLM(llama_path, device="cpu")
    prompt = prompts_of_lengths([40], seed=15)[0]
    llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
    assert llm.reset_prefix_cache()
    again = llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 0


def test_prefix_cache_counters(llama_path):
    llm = LLM(llama_path, device="cpu")
    prompt = prompts_of_lengths([40], seed=16)[0]
    llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
    llm.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.prefix_cache_queries == 80 and stats.prefix_cache_hits == 32
