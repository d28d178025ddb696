"""The JSON wire format of tensor parallelism: every message survives a round trip unchanged, every
field is on the wire, and nothing is pickled."""

from __future__ import annotations

import dataclasses
import math

import torch

from carpool.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
from carpool.core.sched_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    PromptLogprobs,
    SchedulerOutput,
    TokenLogprobs,
)
from carpool.sampling_params import RequestOutputKind, SamplingParams
from carpool.worker import tp_codec


def roundtrip(to_dict, from_dict, obj):
    wire = tp_codec.dumps(to_dict(obj))
    assert isinstance(wire, bytes) and wire.startswith(b"{")  # JSON, not a pickle stream
    return from_dict(tp_codec.loads(wire))


def unusual_params() -> SamplingParams:
    p = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, seed=-17, presence_penalty=0.5,
                       frequency_penalty=-0.25, repetition_penalty=1.3, max_tokens=33, min_tokens=2,
                       stop=["a", "stop"], stop_token_ids=[3, 4], include_stop_str_in_output=True,
                       ignore_eos=True, logprobs=3, prompt_logprobs=4, skip_special_tokens=False, detokenize=False,
                       output_kind=RequestOutputKind.DELTA)
    p.eos_token_ids = (257, 2)
    return p


def test_sampling_params_round_trip_with_enum_and_tuple_intact():
    p = unusual_params()
    back = roundtrip(tp_codec.sampling_params_to_dict, tp_codec.sampling_params_from_dict, p)
    assert back == p
    assert back.output_kind is RequestOutputKind.DELTA and back.eos_token_ids == (257, 2)
    assert set(tp_codec.sampling_params_to_dict(p)) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_engine_filled_params_are_restored_without_revalidation():
    p = SamplingParams(max_tokens=4)
    p.max_tokens = 0  # the engine sets this itself for a prompt that fills max_model_len
    back = roundtrip(tp_codec.sampling_params_to_dict, tp_codec.sampling_params_from_dict, p)
    assert back.max_tokens == 0


def test_scheduler_output_round_trip_keeps_batch_order():
    so = SchedulerOutput(
        new_reqs=[NewRequestData("b", [1, 2, 3], [9], unusual_params(), [4, 5], 16),
                  NewRequestData("a", [7], [], SamplingParams(temperature=0.0), [6], 0)],
        cached_reqs=[CachedRequestData("z", [8], 40), CachedRequestData("c", [], 12, num_blocks_kept=3)],
        num_scheduled_tokens={"z": 1, "c": 3, "b": 4, "a": 1},
        total_num_scheduled_tokens=9, finished_req_ids={"x", "y"}, scheduled_spec_decode_tokens={"c": [5, 6]})
    back = roundtrip(tp_codec.scheduler_output_to_dict, tp_codec.scheduler_output_from_dict, so)
    assert back == so
    assert list(back.num_scheduled_tokens) == ["z", "c", "b", "a"]
    assert set(tp_codec.scheduler_output_to_dict(so)) == {f.name for f in dataclasses.fields(SchedulerOutput)}
    new_keys = set(tp_codec.scheduler_output_to_dict(so)["new_reqs"][0])
    assert new_keys == {f.name for f in dataclasses.fields(NewRequestData)}
    cached_keys = set(tp_codec.scheduler_output_to_dict(so)["cached_reqs"][0])
    assert cached_keys == {f.name for f in dataclasses.fields(CachedRequestData)}


def test_runner_output_round_trip_keeps_infinite_logprobs_and_prompt_logprobs():
    out = ModelRunnerOutput(req_ids=["a", "b"], sampled_token_ids=[5, 6],
                            logprobs=[None, TokenLogprobs([6, 1], [-0.1234567891234, -math.inf], [1, 2])],
                            spec_token_ids={"b": [7, 8, 9]},
                            prompt_logprobs={"b": PromptLogprobs(17, [TokenLogprobs([3, 3], [-1.5, -1.5], [1, 1]),
                                                                      TokenLogprobs([9], [-math.inf], [258])])})
    back = roundtrip(tp_codec.runner_output_to_dict, tp_codec.runner_output_from_dict, out)
    assert back == out
    assert set(tp_codec.runner_output_to_dict(out)) == {f.name for f in dataclasses.fields(ModelRunnerOutput)}


def test_engine_config_round_trip(llama_path):
    model = ModelConfig.from_pretrained(llama_path, "bfloat16")
    config = EngineConfig(model=model, cache=CacheConfig(block_size=8, kv_cache_memory_bytes=1 << 20),
                          scheduler=SchedulerConfig(max_num_seqs=3), parallel=ParallelConfig(2),
                          device="cpu", kernel_backend="torch", seed=5, enforce_eager=True, tokenizer="tok",
                          async_scheduling=True, load_format="dummy", quantization="fp8", kv_cache_dtype="fp8",
                          speculative_config=SpeculativeConfig(method="ngram", num_speculative_tokens=2,
                                                               prompt_lookup_min=1, prompt_lookup_max=3,
                                                               disable_by_batch_size=None),
                          )  # non-defaults: each must travel
    back = roundtrip(tp_codec.engine_config_to_dict, tp_codec.engine_config_from_dict, config)
    assert back == config and back.model.dtype is torch.bfloat16
    assert back.model.rope_scaling == model.rope_scaling and back.model.hf_config == model.hf_config
