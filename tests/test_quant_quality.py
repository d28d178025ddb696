"""benchmarks/quant_quality.py: held-out perplexity through the serving engine. The engine's perplexity of
the unquantized model is transformers' in float32 on the same tokens, its tokens are the chunks
`carpool eval` scores, and every method runs end to end on a tiny sharded bf16 Llama (the layout of the
trained demo model's export) and reports its ratio to the unquantized perplexity."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from checkpoints import build_checkpoint
from quant_checkpoints import QUANT_DIMS

from carpool.training.data import eval_batches
from carpool.training.pretokenize import open_tokens, write_token_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quant_quality  # noqa: E402

SEQUENCES, SEQ_LEN = 2, 24


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny Llama saved as the demo export is: bf16, sharded with an index, tied embeddings."""
    path = str(tmp_path_factory.mktemp("quality-model"))
    return build_checkpoint(path, "llama", dtype=torch.bfloat16, max_shard_size="200KB", tie_word_embeddings=True,
                            **QUANT_DIMS)


def _token_file(path, split: str, seed: int) -> str:
    prefix = str(path / split)
    tokens = np.random.default_rng(seed).integers(0, 256, 400)
    write_token_file(tokens, prefix, vocab_size=258, bos_token_id=256, eos_token_id=257, pad_token_id=257,
                     split=split)
    return prefix


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> str:
    return _token_file(tmp_path_factory.mktemp("quality-data"), "heldout", seed=0)


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> str:
    return _token_file(tmp_path_factory.mktemp("quality-data"), "train", seed=1)


def test_token_chunks_are_the_chunks_carpool_eval_scores(heldout):
    got = quant_quality.token_chunks(heldout, 3, SEQ_LEN)
    tokens, _ = open_tokens(heldout)
    batch = next(eval_batches(tokens, SEQ_LEN, batch_size=3))
    assert got == [inputs + [labels[-1]] for inputs, labels in zip(batch.input_ids.tolist(), batch.labels.tolist())]


def test_engine_perplexity_of_the_unquantized_model_is_transformers_float32(model, heldout):
    from transformers import AutoModelForCausalLM

    from carpool import LLM

    sequences = quant_quality.token_chunks(heldout, SEQUENCES, SEQ_LEN)
    got = quant_quality.engine_perplexity(LLM(model, device="cpu", dtype="float32"), sequences)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor(sequences)
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[:, :-1].float(), dim=-1)
    nll = -logprobs.gather(-1, ids[:, 1:, None]).double().mean().item()
    assert got["tokens"] == SEQUENCES * SEQ_LEN
    assert got["loss"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.fixture(scope="module")
def report(model, heldout, train, tmp_path_factory) -> dict:
    """The benchmark's JSON, every method (GPTQ calibrated on the train tokens), through its command line."""
    out = str(tmp_path_factory.mktemp("quality-out") / "quality.json")
    argv = sys.argv
    sys.argv = ["quant_quality.py", "--model", model, "--data", heldout, "--device", "cpu",
                "--sequences", str(SEQUENCES), "--seq-len", str(SEQ_LEN), "--calibration", train,
                "--calibration-sequences", "4", "--out", out]
    try:
        quant_quality.main()
    finally:
        sys.argv = argv
    with open(out) as f:
        return json.load(f)


def test_every_method_reports_its_perplexity_and_ratio(report):
    assert set(report["methods"]) == {m.name for m in quant_quality.METHODS}
    assert (report["sequences"], report["seq_len"], report["scored_tokens"]) == (SEQUENCES, SEQ_LEN,
                                                                                 SEQUENCES * SEQ_LEN)
    base = report["methods"]["unquantized"]["perplexity"]
    for name, r in report["methods"].items():
        assert r["tokens"] == SEQUENCES * SEQ_LEN, name
        assert r["ratio"] == pytest.approx(r["perplexity"] / base), name
        assert 0.8 < r["ratio"] < 1.25, name  # a random model: quantization noise moves it by a little
    assert set(report["targets"]) == set(quant_quality.TARGETS)


def test_each_method_runs_the_quantization_it_names(report):
    described = {name: (r["quantization"], r["kv_cache_dtype"]) for name, r in report["methods"].items()}
    assert described == {
        "unquantized": (None, "float32"),
        "fp8_kv": (None, "float8_e4m3fn"),
        "fp8_online": ("fp8", "float32"),
        "fp8_checkpoint": ("compressed-tensors-fp8", "float32"),
        "fp8_w8a8_fp8_kv": ("compressed-tensors-fp8", "float8_e4m3fn"),
        "int4_awq": ("awq", "float32"),
        "int4_gptq": ("gptq", "float32"),
    }
    for name, r in report["methods"].items():
        if name != "unquantized":
            assert r["perplexity"] != report["methods"]["unquantized"]["perplexity"], name


def test_the_fp8_checkpoint_scores_as_online_fp8_quantization(report):
    """The writer's per-channel FP8 weights are the ones `--quantization fp8` computes while loading."""
    assert report["methods"]["fp8_checkpoint"]["perplexity"] == report["methods"]["fp8_online"]["perplexity"]


def test_gptq_is_calibrated_on_the_given_tokens(report, train):
    assert report["calibration"] == {"data": os.path.abspath(train), "sequences": 4, "seq_len": SEQ_LEN}


def test_gptq_without_calibration_tokens_is_refused(model, heldout):
    with pytest.raises(ValueError, match="^calibration: int4_gptq"):
        quant_quality.run_quality(model, heldout, "cpu", SEQUENCES, SEQ_LEN, methods=["int4_gptq"])


def test_calibrating_on_the_heldout_tokens_is_refused(model, heldout):
    with pytest.raises(ValueError, match="^calibration: the held-out file"):
        quant_quality.run_quality(model, heldout, "cpu", SEQUENCES, SEQ_LEN, calibration=heldout)


def test_tokens_past_the_models_vocabulary_are_refused(model, tmp_path):
    prefix = str(tmp_path / "heldout")
    write_token_file(np.arange(300) % 300, prefix, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with pytest.raises(ValueError, match="^data: tokenized with a vocabulary of 300"):
        quant_quality.check_data_matches_model(model, prefix)


def test_tokens_of_another_tokenizer_are_refused(model, heldout, tmp_path):
    for ext in (".bin", ".json"):
        shutil.copy(heldout + ext, str(tmp_path / "heldout") + ext)
    header = str(tmp_path / "heldout.json")
    with open(header) as f:
        meta = json.load(f)
    with open(header, "w") as f:
        json.dump({**meta, "tokenizer_sha256": "0" * 64}, f)
    with pytest.raises(ValueError, match="^data: .* another tokenizer"):
        quant_quality.check_data_matches_model(model, str(tmp_path / "heldout"))


def test_unknown_methods_are_refused_naming_the_field(model, heldout):
    with pytest.raises(ValueError, match="^methods: unknown int3"):
        quant_quality.run_quality(model, heldout, "cpu", SEQUENCES, SEQ_LEN, methods=["int3"])


def test_more_sequences_than_the_file_holds_are_refused(heldout):
    with pytest.raises(ValueError, match="^sequences: "):
        quant_quality.token_chunks(heldout, 100, SEQ_LEN)


def test_more_calibration_sequences_than_the_file_holds_are_refused_naming_that_option(model, heldout, train):
    with pytest.raises(ValueError, match="^calibration_sequences: "):
        quant_quality.run_quality(model, heldout, "cpu", SEQUENCES, SEQ_LEN, methods=["int4_gptq"], calibration=train,
                                  calibration_sequences=100)
