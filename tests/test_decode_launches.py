"""What one decoder layer launches in a batch-1 decode step with the Triton kernels (the kernels a CUDA
graph replays, counted in the interpreter: tests/launch_count.py).

Why pin it: a batch-1 step is launch-bound as much as bandwidth-bound (a few microseconds per kernel in a
graph, times every layer), and a torch kernel between two Triton kernels breaks their PDL chain. Llama
projects q/k/v with RoPE and the KV store in one GEMV; Qwen3's per-head q/k RMSNorm needs a whole head
before RoPE, which the pair-per-program GEMV does not hold, so Qwen3 runs the plain GEMV and then one
elementwise kernel for norm, RoPE and store (ops/triton/elementwise.py rope_and_store_kv): one launch more
per layer, and still no torch kernel.
"""

from __future__ import annotations

import pytest
from triton_cases import interpreter_only

from carpool.models.llama import LlamaDecoderLayer

NORM, GEMV, ROPE_STORE, DECODE = "_rms_norm_kernel", "_gemv_kernel", "_rope_store_kv_kernel", "_decode_kernel"
MLP = [NORM, GEMV, GEMV]  # post-attention norm, gate/up GEMV with SiLU-and-mul, down GEMV


def decode_step_layer_launches(path: str, monkeypatch: pytest.MonkeyPatch) -> list:
    """The launches of each decoder layer in the last forward of a one-request greedy run (a decode step)."""
    from checkpoints import prompts_of_lengths
    from launch_count import count_launches

    from carpool import LLM, SamplingParams

    per_layer: list = []
    forward = LlamaDecoderLayer.forward

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with count_launches() as launches:
            out = forward(self, *args, **kwargs)
        per_layer.append(launches)
        return out

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counted)
    llm = LLM(path, device="cpu", kernel_backend="triton")
    num_layers = len(llm.engine.core.executor.runner.model.attention_layers())
    llm.generate([{"prompt_token_ids": prompts_of_lengths([3])[0]}],
                 SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    return per_layer[-num_layers:]


def assert_no_torch_kernel(layers: list) -> None:
    # The first layer of an eager step uploads the step's decode-balance plan (one host-to-device copy,
    # ops/triton/attention.py _eager_balance); a CUDA graph finds it in its own buffers instead.
    assert layers[0].torch() in ([], ["to"])
    assert all(launches.torch() == [] for launches in layers[1:])


@interpreter_only
def test_batch1_llama_layer_projects_qkv_with_rope_and_store_in_one_gemv(checkpoint_factory, monkeypatch) -> None:
    layers = decode_step_layer_launches(checkpoint_factory("llama"), monkeypatch)
    assert all(launches.triton() == [NORM, GEMV, DECODE, GEMV] + MLP for launches in layers)
    assert_no_torch_kernel(layers)


@interpreter_only
def test_batch1_qwen3_layer_norms_rotates_and_stores_in_one_kernel_after_the_gemv(checkpoint_factory,
                                                                                  monkeypatch) -> None:
    layers = decode_step_layer_launches(checkpoint_factory("qwen3"), monkeypatch)
    assert all(launches.triton() == [NORM, GEMV, ROPE_STORE, DECODE, GEMV] + MLP for launches in layers)
    assert_no_torch_kernel(layers)
