"""Prompt logprobs (SamplingParams.prompt_logprobs -> RequestOutput.prompt_logprobs, vLLM's names): on the
tiny models they equal transformers' log-softmax over the same prompt in float32, whether the prompt is
prefilled in one step or in chunks, scheduled asynchronously, preempted and recomputed, or shares a
prefix that the cache holds (a request that wants prompt logprobs computes its whole prompt)."""

from __future__ import annotations

import pytest
import torch
from checkpoints import prompts_of_lengths

from carpool import LLM, SamplingParams
from carpool.outputs import RequestOutput

TOP = 3
LENGTHS = [1, 2, 17, 40, 100]
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]

_reference: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}


def hf_log_softmax(path: str, prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row i is the distribution of prompt token i + 1 given those before it."""
    key = (path, tuple(prompt))
    if key not in _reference:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0, :-1].float()
        _reference[key] = torch.log_softmax(logits, dim=-1)
    return _reference[key]


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 2, "ignore_eos": True, "prompt_logprobs": TOP, **kw})


def assert_matches_reference(path: str, out: RequestOutput) -> None:
    prompt = out.prompt_token_ids
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    if len(prompt) == 1:
        return
    ref = hf_log_softmax(path, prompt)
    for i in range(1, len(prompt)):
        entry, row, token = got[i], ref[i - 1], prompt[i]
        assert entry is not None and token in entry
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4, rel=1e-4), (i, token)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top_values, top_ids = row.topk(TOP)
        for rank, (t, v) in enumerate(zip(top_ids.tolist(), top_values.tolist()), start=1):
            assert t in entry and entry[t].logprob == pytest.approx(v, abs=1e-4, rel=1e-4)
            assert t == token or entry[t].rank == rank
        assert set(entry) == set(top_ids.tolist()) | {token}


def generate(llm: LLM, prompts: list[list[int]], p: SamplingParams) -> list[RequestOutput]:
    return llm.generate([{"prompt_token_ids": q} for q in prompts], p, use_tqdm=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_equal_transformers_log_softmax(checkpoint_factory, arch):
    path = checkpoint_factory(arch)
    prompts = prompts_of_lengths(LENGTHS, seed=3)
    for out in generate(LLM(path, device="cpu"), prompts, params()):
        assert_matches_reference(path, out)


@pytest.mark.parametrize("engine_args", [
    dict(max_num_batched_tokens=16),
    dict(max_num_batched_tokens=24, async_scheduling=True),
    dict(num_kv_blocks=12, enable_prefix_caching=False),
    dict(num_kv_blocks=12, max_num_batched_tokens=24,
         speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}),
], ids=["chunked", "chunked-async", "preempted", "speculating-chunked-preempted"])
def test_prompt_logprobs_are_the_same_however_the_prompt_is_scheduled(llama_path, engine_args):
    prompts = prompts_of_lengths([100, 90, 70, 40], seed=4)
    llm = LLM(llama_path, device="cpu", **engine_args)
    outs = generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                 prompt_logprobs=TOP))
    for out in outs:
        assert_matches_reference(llama_path, out)
    if "num_kv_blocks" in engine_args:
        assert llm.engine.stats().num_preemptions > 0
    if "speculative_config" in engine_args:  # verification steps (rolled back) ran beside the scoring
        assert llm.engine.stats().spec_decode_num_draft_tokens > llm.engine.stats().spec_decode_num_accepted_tokens > 0


def test_a_cached_prefix_does_not_lose_its_logprobs(llama_path):
    llm = LLM(llama_path, device="cpu", enable_prefix_caching=True)
    prompt = prompts_of_lengths([70], seed=9)[0]  # 4 full blocks + 6 tokens
    plain = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    assert generate(llm, [prompt], plain)[0].num_cached_tokens == 0
    assert generate(llm, [prompt], plain)[0].num_cached_tokens == 64  # the cache holds the prefix...
    (scored,) = generate(llm, [prompt], params())
    assert scored.num_cached_tokens == 0  # ... but scoring computes it all again
    assert_matches_reference(llama_path, scored)
    # and it never takes the hits away from requests that do not score
    assert generate(llm, [prompt], plain)[0].num_cached_tokens == 64


def test_n_sequences_get_one_set_of_prompt_logprobs_and_the_same_tokens(llama_path):
    llm = LLM(llama_path, device="cpu")
    prompt = prompts_of_lengths([30], seed=2)[0]
    (out,) = generate(llm, [prompt], params(n=3, temperature=0.8, seed=1))
    assert len(out.outputs) == 3
    assert_matches_reference(llama_path, out)
    (plain,) = generate(llm, [prompt], SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=2, ignore_eos=True))
    assert [c.token_ids for c in plain.outputs] == [c.token_ids for c in out.outputs]


def test_without_prompt_logprobs_there_are_none(llama_path):
    llm = LLM(llama_path, device="cpu")
    out = generate(llm, prompts_of_lengths([10]), SamplingParams(max_tokens=2))[0]
    assert out.prompt_logprobs is None
