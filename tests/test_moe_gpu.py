"""Mixture-of-experts models end to end on a GPU (marked gpu; not run in CI).

The float32 torch_ref path on the same GPU (the expert loop, eager) is the oracle: the fused Triton MoE
with CUDA graphs in bf16 must give the same first greedy tokens up to bf16 near-ties, in float32 the same
tokens; CUDA graphs and the async scheduler must not change the Triton path's tokens.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_checkpoint, prompts_of_lengths
from test_gpu_engine import FIRST_TOKENS, LOGPROB_TOL, compare_until_near_tie

from carpool import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# batch 1 (the per-pair GEMV path), a few prompts and long ones (the grouped GEMM in prefill)
LENGTHS = [1, 7, 16, 33, 100, 257, 600]
SHAPE = dict(seed=1, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             head_dim=128, max_position_embeddings=2048, initializer_range=0.05)


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def moe_checkpoint(request, tmp_path_factory) -> str:
    """Qwen3-MoE with 64 experts, top-8 (one dense layer); Qwen2-MoE with 16 experts, top-4 and a shared
    expert: head_dim 128 and expert widths of the production kernels' kind."""
    family = request.param
    experts = dict(num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256, intermediate_size=1024)
    if family == "qwen2_moe":
        experts = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, intermediate_size=1024,
                       shared_expert_intermediate_size=512)
    return build_checkpoint(str(tmp_path_factory.mktemp(f"gpu-{family}")), family, **SHAPE, **experts)


def run(path: str, prompts, **kwargs):
    llm = LLM(path, device="cuda", **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=FIRST_TOKENS * 4, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.shutdown()
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs]


def test_moe_triton_bf16_with_cuda_graphs_matches_float32_torch_reference(moe_checkpoint):
    prompts = prompts_of_lengths(LENGTHS, seed=3)
    ref = run(moe_checkpoint, prompts, dtype="float32", kernel_backend="torch", enforce_eager=True)
    fast = run(moe_checkpoint, prompts, dtype="bfloat16", kernel_backend="triton")
    worst, parted, compared = compare_until_near_tie(ref, fast, FIRST_TOKENS * 2)
    print(f"MoE bf16 Triton+graphs vs fp32 torch_ref: max |logprob diff| {worst:.4f} over {compared} tokens; "
          f"{parted}/{len(prompts)} prompts parted at a near tie")
    assert worst < LOGPROB_TOL
    assert parted <= len(prompts) // 2


def test_moe_triton_float32_matches_torch_reference_tokens(moe_checkpoint):
    prompts = prompts_of_lengths(LENGTHS, seed=4)
    ref = run(moe_checkpoint, prompts, dtype="float32", kernel_backend="torch", enforce_eager=True)
    fast = run(moe_checkpoint, prompts, dtype="float32", kernel_backend="triton")
    for r, f in zip(ref, fast):
        assert f.token_ids[:8] == r.token_ids[:8]


def test_moe_cuda_graphs_and_async_scheduling_keep_the_eager_tokens(moe_checkpoint):
    """The fused MoE has no host sync and no atomics: replayed graphs, and steps scheduled while the
    previous one runs, give the eager path's tokens exactly."""
    prompts = prompts_of_lengths(LENGTHS, seed=5)
    eager = run(moe_checkpoint, prompts, dtype="bfloat16", kernel_backend="triton", enforce_eager=True)
    graphs = run(moe_checkpoint, prompts, dtype="bfloat16", kernel_backend="triton")
    overlapped = run(moe_checkpoint, prompts, dtype="bfloat16", kernel_backend="triton", async_scheduling=True)
    assert [g.token_ids for g in graphs] == [e.token_ids for e in eager]
    assert [a.token_ids for a in overlapped] == [e.token_ids for e in eager]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_moe_expert_parallel_tp2_float32_matches_torch_reference_tokens(moe_checkpoint):
    """Two GPUs with whole experts each (Qwen3-MoE: 32 of 64, Qwen2-MoE: 8 of 16), Triton path with CUDA
    graphs, NCCL or the one-shot all-reduce summing the ranks' experts: the single-GPU float32 reference's
    first tokens."""
    prompts = prompts_of_lengths(LENGTHS, seed=6)
    ref = run(moe_checkpoint, prompts, dtype="float32", kernel_backend="torch", enforce_eager=True)
    ep = run(moe_checkpoint, prompts, dtype="float32", kernel_backend="triton", tensor_parallel_size=2,
             enable_expert_parallel=True, kv_cache_memory_bytes=1 << 28, gpu_memory_utilization=0.3)
    for r, f in zip(ref, ep):
        assert f.token_ids[:8] == r.token_ids[:8]
