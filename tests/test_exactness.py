"""Greedy output equals Hugging Face transformers' greedy output token for token (CPU, float32),
however the engine batches, chunks, preempts or reuses cached prefixes."""

from __future__ import annotations

import pytest
from checkpoints import hf_greedy, prompts_of_lengths

from carpool import LLM, SamplingParams

LENGTHS = [1, 2, 5, 15, 16, 17, 31, 33, 64, 100, 150, 200]
MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)

_reference: dict[str, list[list[int]]] = {}


def reference(path: str, prompts: list[list[int]]) -> list[list[int]]:
    if path not in _reference:
        _reference[path] = hf_greedy(path, prompts, MAX_NEW)
    return _reference[path]


def run(path: str, prompts: list[list[int]], **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, device="cpu", **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    """Every exactness test runs twice: steps resolved one at a time, and the next step scheduled while
    the previous one is still in flight (its sampled tokens fed to the next step on the device)."""
    return request.param


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_default_settings(checkpoint_factory, arch, async_scheduling):
    path = checkpoint_factory(arch)
    prompts = prompts_of_lengths(LENGTHS)
    got, llm = run(path, prompts, async_scheduling=async_scheduling)
    assert got == reference(path, prompts)
    assert all(len(t) == MAX_NEW for t in got)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_with_chunked_prefill(checkpoint_factory, arch, async_scheduling):
    path = checkpoint_factory(arch)
    prompts = prompts_of_lengths(LENGTHS)
    got, llm = run(path, prompts, max_num_batched_tokens=32, async_scheduling=async_scheduling)
    assert got == reference(path, prompts)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_under_preemption(checkpoint_factory, arch, async_scheduling):
    path = checkpoint_factory(arch)
    prompts = prompts_of_lengths(LENGTHS)
    # The longest request needs ceil((200 + 12) / 16) = 14 blocks; 16 blocks cannot hold the batch.
    got, llm = run(path, prompts, num_kv_blocks=16, enable_prefix_caching=False,
                   async_scheduling=async_scheduling)
    assert llm.engine.stats().num_preemptions > 0
    assert got == reference(path, prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_hf_with_chunking_preemption_and_prefix_cache(checkpoint_factory, arch,
                                                                  async_scheduling):
    path = checkpoint_factory(arch)
    prompts = prompts_of_lengths(LENGTHS)
    got, llm = run(path, prompts, num_kv_blocks=18, max_num_batched_tokens=24, enable_prefix_caching=True,
                   async_scheduling=async_scheduling)
    assert llm.engine.stats().num_preemptions > 0
    assert got == reference(path, prompts)
