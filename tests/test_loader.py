"""Checkpoint loading: sharded files, dtypes, tied embeddings, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from checkpoints import build_checkpoint, copy_without_weight, hf_greedy, prompts_of_lengths

from carpool import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def greedy(path: str, prompts, **kw):
    llm = LLM(path, device="cpu", **kw)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY,
                                                          use_tqdm=False)]


def test_sharded_checkpoint_loads_and_matches_hf(tmp_path):
    path = build_checkpoint(str(tmp_path / "sharded"), "llama", seed=3, max_shard_size="60KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    prompts = prompts_of_lengths([4, 30])
    assert greedy(path, prompts) == hf_greedy(path, prompts, 8)


def test_bfloat16_checkpoint_runs_in_float32_on_cpu_by_default(tmp_path):
    path = build_checkpoint(str(tmp_path / "bf16"), "qwen2", seed=4, dtype=torch.bfloat16)
    llm = LLM(path, device="cpu")
    assert llm.engine.config.model.dtype == torch.float32
    assert next(llm.engine.core.executor.runner.model.parameters()).dtype == torch.float32
    prompts = prompts_of_lengths([10])
    assert greedy(path, prompts) == hf_greedy(path, prompts, 8)  # HF upcasts to float32 as well


def test_explicit_dtype_is_honoured(llama_path):
    llm = LLM(llama_path, device="cpu", dtype="bfloat16")
    assert next(llm.engine.core.executor.runner.model.parameters()).dtype == torch.bfloat16
    out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8


def test_tied_embeddings_share_one_tensor(checkpoint_factory):
    llm = LLM(checkpoint_factory("qwen2"), device="cpu")
    model = llm.engine.core.executor.runner.model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, llama_path):
    path = tmp_path / "gpt2ish"
    shutil.copytree(llama_path, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(path), device="cpu")


def test_missing_weights_are_named(tmp_path, llama_path):
    path = copy_without_weight(llama_path, str(tmp_path / "partial"), "model.layers.1.mlp.down_proj.weight")
    with pytest.raises(ValueError, match="down_proj"):
        LLM(path, device="cpu")


def test_a_missing_model_directory_or_repo_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="^model"):
        LLM(str(tmp_path / "nope" / "not-a-repo"), device="cpu")


def test_checkpoint_without_tokenizer_serves_token_ids(tmp_path, llama_path):
    path = tmp_path / "notok"
    os.makedirs(path)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(llama_path, f), path / f)
    llm = LLM(str(path), device="cpu")
    out = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.text == ""
    with pytest.raises(ValueError, match="^prompt.*tokenizer"):
        llm.generate("text", GREEDY, use_tqdm=False)
