"""Bad input raises ValueError naming the field, and the engine keeps serving afterwards."""

from __future__ import annotations

import pytest

from carpool import LLM, SamplingParams
from carpool.sampling_params import MAX_LOGPROBS, MAX_N

BAD_PARAMS = [
    ("n", dict(n=0)), ("n", dict(n=MAX_N + 1)), ("n", dict(n=1.5)),
    ("temperature", dict(temperature=-0.1)), ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature="hot")),
    ("top_p", dict(top_p=0.0)), ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)), ("top_k", dict(top_k=2.5)),
    ("min_p", dict(min_p=-0.1)), ("min_p", dict(min_p=1.1)),
    ("seed", dict(seed="x")), ("seed", dict(seed=1 << 70)),
    ("presence_penalty", dict(presence_penalty=3.0)), ("frequency_penalty", dict(frequency_penalty=-2.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)), ("repetition_penalty", dict(repetition_penalty=5.0)),
    ("max_tokens", dict(max_tokens=0)), ("max_tokens", dict(max_tokens=-5)), ("max_tokens", dict(max_tokens=1 << 40)),
    ("min_tokens", dict(min_tokens=-1)), ("min_tokens", dict(min_tokens=20, max_tokens=10)),
    ("stop", dict(stop=[""])), ("stop", dict(stop=["s"] * 100)), ("stop", dict(stop=["x" * 1000])),
    ("stop_token_ids", dict(stop_token_ids=[-1])), ("stop_token_ids", dict(stop_token_ids=list(range(100)))),
    ("logprobs", dict(logprobs=-1)), ("logprobs", dict(logprobs=MAX_LOGPROBS + 1)),
    ("ignore_eos", dict(ignore_eos="yes")),
]


@pytest.mark.parametrize("field,kwargs", BAD_PARAMS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_PARAMS)])
def test_invalid_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kwargs)


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0


@pytest.fixture(scope="module")
def llm(llama_path) -> LLM:
    return LLM(llama_path, device="cpu", max_model_len=64)


GOOD = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize("prompt,field", [
    ("", "prompt"),
    ([], "prompt"),
    ({"prompt_token_ids": []}, "prompt"),
    ([1, 2, 258], "prompt_token_ids"),
    ([1, -1], "prompt_token_ids"),
    ([1, "a"], "prompt_token_ids"),
    (list(range(65)), "prompt"),
    ({"foo": 1}, "prompt"),
    (3.5, "prompt"),
])
def test_bad_prompts_are_refused_and_the_engine_keeps_serving(llm, prompt, field):
    before = llm.generate([[1, 2, 3]], GOOD, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match=f"^{field}"):
        llm.generate([[5, 6], prompt], GOOD, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # the good prompt added before the bad one was aborted
    assert llm.generate([[1, 2, 3]], GOOD, use_tqdm=False)[0].outputs[0].token_ids == before


def test_prompt_plus_max_tokens_beyond_max_model_len_is_refused(llm):
    with pytest.raises(ValueError, match="^max_tokens"):
        llm.generate([list(range(60))], SamplingParams(max_tokens=10), use_tqdm=False)
    out = llm.generate([list(range(60))], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) <= 4


def test_request_larger_than_the_whole_cache_is_refused(llama_path):
    small = LLM(llama_path, device="cpu", num_kv_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="^max_tokens.*KV blocks"):
        small.generate([list(range(30))], SamplingParams(max_tokens=10), use_tqdm=False)
    assert len(small.generate([list(range(20))], GOOD, use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_unknown_engine_argument_is_a_type_error(llama_path):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(llama_path, device="cpu", max_num_seq=4)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(block_size=0), "block_size"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"), (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(dtype="int8"), "dtype"), (dict(max_model_len=100000), "max_model_len"), (dict(device="tpu"), "device"),
])
def test_bad_engine_arguments_name_the_field(llama_path, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        LLM(llama_path, **{"device": "cpu", **kwargs})
