"""The speculative config: vLLM's JSON keys and defaults, every field checked where it enters (the error
names the field), unknown keys refused, and the config carried to tensor-parallel ranks unchanged."""

from __future__ import annotations

import argparse
import json

import pytest

from carpool.config import DEFAULT_DISABLE_BY_BATCH_SIZE, SpeculativeConfig
from carpool.engine.arg_utils import EngineArgs
from carpool.worker import tp_codec


def test_json_string_and_dict_give_the_same_config():
    d = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
    assert SpeculativeConfig.from_dict(json.dumps(d)) == SpeculativeConfig.from_dict(d)
    spec = SpeculativeConfig.from_dict(d)
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max, spec.num_speculative_tokens) == (2, 3, 4)
    assert spec.disable_by_batch_size == DEFAULT_DISABLE_BY_BATCH_SIZE


@pytest.mark.parametrize("given, expected", [({}, (5, 5)), ({"prompt_lookup_max": 3}, (3, 3)),
                                             ({"prompt_lookup_min": 2}, (2, 2))])
def test_ngram_lookup_bounds_default_as_in_vllm(given, expected):
    spec = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, **given})
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == expected


@pytest.mark.parametrize("bad, field", [
    ({"method": "medusa"}, "method"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": "3"}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"prompt_lookup_min": 1, "prompt_lookup_max": 0}, "prompt_lookup_max"),
    ({"disable_by_batch_size": 0}, "disable_by_batch_size"),
    ({"model": "/some/draft"}, "model"),
    ({"acceptance_rate": 0.5}, "acceptance_rate"),
    ({"draft_tensor_parallel_size": 1}, "draft_tensor_parallel_size"),
    ({"lookahead": 3}, "lookahead"),
])
def test_bad_value_is_refused_naming_its_field(bad, field):
    with pytest.raises(ValueError, match=rf"^speculative_config\.{field}:"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, **bad})


def test_missing_method_without_model_and_invalid_json_are_refused():
    with pytest.raises(ValueError, match=r"^speculative_config\.method:"):
        SpeculativeConfig.from_dict({"num_speculative_tokens": 3})
    with pytest.raises(ValueError, match=r"^speculative_config: not valid JSON"):
        SpeculativeConfig.from_dict('{"method": ')


def test_a_model_without_a_method_means_a_draft_model_as_in_vllm():
    spec = SpeculativeConfig.from_dict({"model": "/some/draft", "num_speculative_tokens": 2})
    assert (spec.method, spec.model) == ("draft_model", "/some/draft")


def test_replay_needs_a_recording_and_a_rate(tmp_path):
    with pytest.raises(ValueError, match=r"^speculative_config\.acceptance_rate:"):
        SpeculativeConfig.from_dict({"method": "replay", "num_speculative_tokens": 3, "acceptance_rate": 1.5})
    with pytest.raises(ValueError, match=r"^speculative_config\.replay_path:"):
        SpeculativeConfig.from_dict({"method": "replay", "num_speculative_tokens": 3, "acceptance_rate": 0.5,
                                     "replay_path": str(tmp_path / "missing.json")})


def test_cli_flag_reaches_the_engine_config(llama_path):
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--model", llama_path, "--device", "cpu", "--speculative-config",
                            '{"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 8}'])
    config = EngineArgs.from_cli_args(ns).create_engine_config()
    assert config.speculative_config == SpeculativeConfig("ngram", 3, prompt_lookup_min=5, prompt_lookup_max=5,
                                                          disable_by_batch_size=8)


def test_draft_model_with_another_vocabulary_is_refused(llama_path, checkpoint_factory):
    draft = checkpoint_factory("qwen2", vocab_size=300)
    args = EngineArgs(model=llama_path, device="cpu",
                      speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"^speculative_config\.model: the draft's vocab_size 300"):
        args.create_engine_config()


def test_draft_model_that_is_not_a_checkpoint_is_refused(llama_path, tmp_path):
    args = EngineArgs(model=llama_path, device="cpu", speculative_config={
        "method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"^speculative_config\.model:"):
        args.create_engine_config()


def test_draft_tensor_parallel_size_defaults_to_the_targets(llama_path, tmp_path):
    from test_spec_decode import smaller_draft

    draft = smaller_draft(llama_path, str(tmp_path / "draft"))
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 2}
    config = EngineArgs(model=llama_path, device="cpu", tensor_parallel_size=2,
                        speculative_config=spec).create_engine_config()
    assert config.speculative_config.draft_tensor_parallel_size == 2
    assert config.speculative_config.draft_on_every_rank


@pytest.mark.parametrize("draft_tp", [0, 4])
def test_draft_tensor_parallel_size_other_than_1_or_the_targets_is_refused(llama_path, tmp_path, draft_tp):
    from test_spec_decode import smaller_draft

    spec = {"method": "draft_model", "model": smaller_draft(llama_path, str(tmp_path / "draft")),
            "num_speculative_tokens": 2, "draft_tensor_parallel_size": draft_tp}
    args = EngineArgs(model=llama_path, device="cpu", tensor_parallel_size=2, speculative_config=spec)
    with pytest.raises(ValueError, match=r"^speculative_config\.draft_tensor_parallel_size:"):
        args.create_engine_config()


def test_draft_that_cannot_split_over_the_targets_ranks_is_refused(llama_path, checkpoint_factory):
    draft = checkpoint_factory("llama", intermediate_size=130)  # 130 does not divide by 4
    args = EngineArgs(model=llama_path, device="cpu", tensor_parallel_size=4, speculative_config={
        "method": "draft_model", "model": draft, "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match=r"^speculative_config\.draft_tensor_parallel_size: the draft's "
                                         r"intermediate_size=130"):
        args.create_engine_config()


def test_draft_that_cannot_split_may_run_whole_on_rank_0(llama_path, checkpoint_factory):
    draft = checkpoint_factory("llama", intermediate_size=130)
    whole = {"method": "draft_model", "model": draft, "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1}
    config = EngineArgs(model=llama_path, device="cpu", tensor_parallel_size=4,
                        speculative_config=whole).create_engine_config()
    assert not config.speculative_config.draft_on_every_rank


def test_speculative_config_travels_to_tensor_parallel_ranks(llama_path):
    config = EngineArgs(model=llama_path, device="cpu", speculative_config={
        "method": "ngram", "num_speculative_tokens": 7, "prompt_lookup_min": 1, "prompt_lookup_max": 4,
        "disable_by_batch_size": None}).create_engine_config()
    wire = tp_codec.dumps(tp_codec.engine_config_to_dict(config))
    assert tp_codec.engine_config_from_dict(tp_codec.loads(wire)) == config


def test_serve_refuses_a_bad_speculative_config_naming_the_field(llama_path, capsys):
    pytest.importorskip("fastapi")
    from carpool.entrypoints.cli import main

    bad = '{"method": "ngram", "num_speculative_tokens": 0}'
    assert main(["serve", llama_path, "--device", "cpu", "--port", "0", "--speculative-config", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("carpool serve: error: speculative_config.num_speculative_tokens:") and "Traceback" not in err
