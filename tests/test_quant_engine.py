"""The whole engine on quantized checkpoints (CPU, float32): greedy tokens equal Hugging Face transformers'
on the same model with its weights dequantized by the format's reference, with chunked prefill,
preemption and prefix-cache hits; `--quantization fp8` on a float checkpoint; the FP8 KV cache; the
server on a quantized checkpoint."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
import torch
from checkpoints import prompts_of_lengths
from quant_checkpoints import (
    ENGINE_CELLS,
    MAX_DEFICIT,
    greedy_logprob_deficits,
    hf_agrees_with_greedy,
    make_quant_checkpoint,
    write_online_fp8_reference,
)
from safetensors.torch import load_file, save_file

from carpool import LLM, SamplingParams

MAX_NEW = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
GPU_KV_BYTES = 1 << 28  # a GPU engine's KV cache: enough for the prompts, not 0.9 of the card


def prompts() -> list[list[int]]:
    """Lengths across block and chunk boundaries, and three prompts sharing a 40-token prefix (cache hits)."""
    shared = prompts_of_lengths([40], seed=1)[0]
    return prompts_of_lengths([1, 7, 20, 45, 70]) + [shared + p for p in prompts_of_lengths([3, 11, 19], seed=2)]


def generate(path: str, **engine_args) -> tuple[list[list[int]], LLM]:
    llm = LLM(path, device="cpu", dtype="float32", **engine_args)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


# Chunks of 24 tokens, and 9 blocks of 16 tokens for a batch that needs 18: requests are preempted and
# recomputed; the shared prefix is found in the cache.
SCHEDULING = dict(max_num_batched_tokens=24, num_kv_blocks=9, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    def make(arch: str, fmt: str, group: int = 128, **overrides) -> tuple[str, str]:
        return make_quant_checkpoint(tmp_path_factory, arch, fmt, group, **overrides)
    return make


# The method name describe() reports for each test format.
METHODS = {"awq": "awq", "gptq": "gptq", "gptq-asym": "gptq", "gptq-v2-asym": "gptq",
           "ct-w4a16": "compressed-tensors-w4a16", "ct-w4a16-sym": "compressed-tensors-w4a16",
           "ct-fp8-channel": "compressed-tensors-fp8", "ct-fp8-tensor-static": "compressed-tensors-fp8",
           "ct-fp8-block": "compressed-tensors-fp8", "fp8-tensor": "fp8", "autofp8-static": "fp8",
           "fp8-block": "fp8"}


@pytest.mark.parametrize("arch,fmt", ENGINE_CELLS)
def test_greedy_tokens_equal_the_dequantized_reference_under_chunking_preemption_and_prefix_hits(
        ckpt, arch: str, fmt: str) -> None:
    method = METHODS[fmt]
    quantized, reference = ckpt(arch, fmt)
    got, llm = generate(quantized, **SCHEDULING)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert llm.engine.core.executor.describe()["quantization"] == method
    assert all(len(tokens) == MAX_NEW for tokens in got)
    assert hf_agrees_with_greedy(reference, prompts(), got)


def test_online_fp8_greedy_tokens_equal_the_per_channel_quantized_reference(ckpt, tmp_path) -> None:
    """--quantization fp8 on a float checkpoint runs the model whose every projection is its weight
    rounded to e4m3 with a per-output-channel scale (max |row| / 448)."""
    path, _ = ckpt("llama", "float")
    reference = write_online_fp8_reference(path, str(tmp_path / "ref"))
    got, llm = generate(path, quantization="fp8", **SCHEDULING)
    assert llm.engine.core.executor.describe()["quantization"] == "fp8"
    assert hf_agrees_with_greedy(reference, prompts(), got)
    assert not hf_agrees_with_greedy(path, prompts(), got)  # the quantization is real (this model's tokens move)


def test_fp8_kv_cache_holds_more_tokens_in_the_same_memory(ckpt) -> None:
    path, _ = ckpt("llama", "float")
    budget = dict(kv_cache_memory_bytes=1 << 20)
    plain = LLM(path, device="cpu", dtype="float32", **budget)
    fp8 = LLM(path, device="cpu", dtype="float32", kv_cache_dtype="fp8", **budget)
    assert fp8.engine.core.executor.describe()["kv_cache_dtype"] == "float8_e4m3fn"
    # float32 on CPU: 4 bytes per value against 1 (bf16 on a GPU: 2 against 1)
    assert fp8.engine.stats().num_kv_blocks == 4 * plain.engine.stats().num_kv_blocks


def test_fp8_kv_cache_tokens_do_not_depend_on_chunking_preemption_or_prefix_hits(ckpt) -> None:
    """Every token's K/V is stored in e4m3 before attention reads it back, whether its prompt is prefilled
    whole or in chunks, recomputed after preemption, or found in the prefix cache: the same tokens."""
    path, _ = ckpt("qwen3", "float")
    alone, _ = generate(path, kv_cache_dtype="fp8", enable_prefix_caching=False)
    scheduled, llm = generate(path, kv_cache_dtype="fp8", **SCHEDULING)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert scheduled == alone


def test_server_runs_a_quantized_checkpoint_and_reports_it(ckpt) -> None:
    from server_utils import ServerProcess

    quantized, _ = ckpt("llama", "awq")
    server = ServerProcess(quantized, "--dtype", "float32", "--kv-cache-dtype", "fp8")
    try:
        (card,) = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert (card["quantization"], card["kv_cache_dtype"]) == ("awq", "float8_e4m3fn")
        prompt = prompts()[3]
        body = {"model": card["id"], "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0.0}
        text = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        offline = LLM(quantized, device="cpu", dtype="float32", kv_cache_dtype="fp8")
        assert text == offline.generate([{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0].outputs[0].text
    finally:
        assert server.terminate() == 0, server.log()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt,kv", [("awq", "auto"), ("gptq", "fp8"), ("ct-w4a16", "auto"), ("ct-fp8-channel", "fp8"),
                                    ("fp8-block", "auto")])
def test_gpu_engine_runs_quantized_checkpoints_in_cuda_graphs(ckpt, fmt: str, kv: str) -> None:
    """The Triton kernels in the engine (GEMV at batch <= 8 inside CUDA graphs, GEMM for prefill, the FP8 KV
    cache) in bf16: every greedy token is the dequantized reference's greedy choice on the same prefix, or
    within MAX_DEFICIT of it (a near-tie that FP8 activation rounding may flip). The reference is the same
    engine in bf16 with the same KV cache dtype (an FP8 cache alone moves tokens of these models), reading
    the prompts and the tokens under test in one prefill (teacher forcing), so decode tokens are checked too."""
    quantized, reference = ckpt("llama", fmt)
    llm = LLM(quantized, device="cuda", dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory_bytes=GPU_KV_BYTES)
    paths = llm.engine.core.executor.describe()
    assert paths["cuda_graphs"] and paths["quantization"] is not None
    got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY,
                                                        use_tqdm=False)]
    llm.engine.shutdown()  # its weights and KV cache go before the reference engine profiles memory
    ref = LLM(reference, device="cuda", dtype="bfloat16", kv_cache_dtype=kv, kv_cache_memory_bytes=GPU_KV_BYTES)
    deficits = greedy_logprob_deficits(ref, prompts(), got)
    assert max(max(d) for d in deficits) <= MAX_DEFICIT, (got, deficits)


def _with_kv_scales(src: str, dst: str, scales: dict[str, float]) -> str:
    """A copy of the compressed-tensors checkpoint `src` with per-layer KV-cache scales under the names
    compressed-tensors gives them (initialize_attn_qparams: self_attn.k_scale / v_scale) and a
    kv_cache_scheme in its config."""
    import json

    shutil.copytree(src, dst)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    weights.update({name: torch.tensor([value]) for name, value in scales.items()})
    save_file(weights, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                     "dynamic": False, "symmetric": True}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


def test_checkpoint_kv_scales_reach_each_layer_of_an_fp8_cache_and_are_skipped_otherwise(ckpt, tmp_path) -> None:
    quantized, _ = ckpt("llama", "ct-fp8-channel")
    scales = {f"model.layers.{i}.self_attn.{kv}_scale": 0.25 * (i + 1) + (0.5 if kv == "v" else 0.0)
              for i in range(2) for kv in "kv"}
    path = _with_kv_scales(quantized, str(tmp_path / "kv"), scales)
    llm = LLM(path, device="cpu", dtype="float32", kv_cache_dtype="fp8")
    layers = llm.engine.core.executor.runner.model.attention_layers()
    assert [layer.kv_scales for layer in layers] == [(0.25, 0.75), (0.5, 1.0)]
    # A model-dtype cache has no use for them: the loader passes them by.
    plain = LLM(path, device="cpu", dtype="float32").engine.core.executor.runner.model
    assert not any(hasattr(layer, "k_scale") or hasattr(layer, "kv_scales") for layer in plain.attention_layers())


def test_autofp8_k_and_v_output_scales_reach_each_layer_of_an_fp8_cache(ckpt) -> None:
    """AutoFP8 writes a layer's KV-cache scales as `self_attn.k_proj.output_scale` / `v_proj.output_scale`."""
    quantized, _ = ckpt("llama", "autofp8-static")
    weights = load_file(os.path.join(quantized, "model.safetensors"))
    expected = [tuple(weights[f"model.layers.{i}.self_attn.{kv}_proj.output_scale"].item() for kv in "kv")
                for i in range(2)]
    llm = LLM(quantized, device="cpu", dtype="float32", kv_cache_dtype="fp8")
    assert [layer.kv_scales for layer in llm.engine.core.executor.runner.model.attention_layers()] == expected


def test_a_non_positive_kv_scale_is_refused_naming_the_layer(ckpt, tmp_path) -> None:
    quantized, _ = ckpt("llama", "ct-fp8-channel")
    scales = {f"model.layers.{i}.self_attn.{kv}_scale": 0.0 if (i, kv) == (1, "v") else 1.0
              for i in range(2) for kv in "kv"}
    path = _with_kv_scales(quantized, str(tmp_path / "kv"), scales)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.attn: k_scale, v_scale: .*positive"):
        LLM(path, device="cpu", dtype="float32", kv_cache_dtype="fp8")


def test_tensor_parallel_ranks_load_their_shards_of_a_quantized_checkpoint(ckpt) -> None:
    """TP=2 on CPU (gloo): each rank repacks its own shard of GPTQ weights (groups of 32, so o_proj and
    down_proj split on group boundaries) and stores an FP8 KV cache: the tokens of TP=1 (the quantization
    settings travel to the ranks with the engine config)."""
    quantized, _ = ckpt("llama", "gptq", group=32)
    llm = LLM(quantized, device="cpu", dtype="float32", tensor_parallel_size=2, kv_cache_dtype="fp8")
    try:
        paths = llm.engine.core.executor.describe()
        assert (paths["quantization"], paths["kv_cache_dtype"]) == ("gptq", "float8_e4m3fn")
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY,
                                                            use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == generate(quantized, kv_cache_dtype="fp8")[0]


def test_a_quantized_draft_model_proposes_for_a_float_target(ckpt) -> None:
    """A draft checkpoint loads with its own quantization (here FP8 per channel, the target's weights): its
    guesses are mostly accepted, and greedy output stays the target's, with an FP8 KV cache for both runs."""
    target, _ = ckpt("llama", "float")
    draft, _ = ckpt("llama", "ct-fp8-channel")
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3}
    requests = [{"prompt_token_ids": p} for p in prompts()[2:4]]
    runs = []
    for extra in ({"speculative_config": spec}, {}):
        llm = LLM(target, device="cpu", dtype="float32", kv_cache_dtype="fp8", **extra)
        runs.append([o.outputs[0].token_ids for o in llm.generate(requests, GREEDY, use_tqdm=False)])
        if extra:
            stats = llm.engine.stats()
            assert stats.spec_decode_num_accepted_tokens > stats.spec_decode_num_draft_tokens // 2
    assert runs[0] == runs[1]
