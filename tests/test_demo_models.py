"""The trained demo models shipped in carpool/demo_models: within the shipping limits, a shared vocabulary,
and weights that model Python (the random demo model stays the tests' model elsewhere)."""

from __future__ import annotations

import math
import os

import pytest

import carpool
from carpool import LLM, SamplingParams
from carpool.demo import default_model_path
from carpool.training.demo_model import check_demo_export, trained_demo_model_path

MAIN, DRAFT = trained_demo_model_path("main"), trained_demo_model_path("draft")
pytestmark = pytest.mark.skipif(MAIN is None or DRAFT is None, reason="the package ships no trained demo models")


def test_the_shipped_models_are_within_the_limits_and_share_one_tokenizer():
    main, draft = check_demo_export(MAIN, "main"), check_demo_export(DRAFT, "draft")
    assert main.vocab_size == draft.vocab_size
    with open(os.path.join(MAIN, "tokenizer.json"), "rb") as a, open(os.path.join(DRAFT, "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()
    assert default_model_path() == MAIN


def test_the_main_model_predicts_python_it_never_saw_far_better_than_chance():
    # carpool's own sources were not in the training corpus (the installed packages and the stdlib were)
    with open(os.path.join(os.path.dirname(carpool.__file__), "sampling_params.py")) as f:
        text = f.read()
    llm = LLM(model=MAIN, device="cpu", max_model_len=1024)
    ids = llm.get_tokenizer().encode(text)[:1000]
    assert len(ids) == 1000
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    logprobs = [d[ids[i + 1]].logprob for i, d in enumerate(out[0].prompt_logprobs[1:])]
    perplexity = math.exp(-sum(logprobs) / len(logprobs))
    assert perplexity < 20, perplexity  # about 10 when shipped; uniform over the vocabulary: 8192
