"""End-to-end GPU checks (marked gpu; run through scripts/gpu_suite.sh on an H100/H200).

The float32 torch_ref path on the same GPU is the oracle: Triton kernels + CUDA graphs in bf16 must give
the same first greedy tokens, with logprobs within a stated tolerance; graphs must not change results
against eager execution of the same kernels.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_checkpoint, prompts_of_lengths

from carpool import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FIRST_TOKENS = 4
LOGPROB_TOL = 0.15  # bf16 weights/activations vs float32: |logprob difference| of the top tokens
NEAR_TIE = 2 * LOGPROB_TOL  # a top-1/top-2 logprob gap bf16 may not resolve
LENGTHS = [1, 7, 16, 33, 100, 257, 600]


def build_gpu_checkpoint(directory: str) -> str:
    """A small Qwen3-style model with head_dim 128 (the production kernel shape), peaked distributions."""
    return build_checkpoint(directory, "qwen3", seed=1, hidden_size=512, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                            max_position_embeddings=2048, initializer_range=0.05)


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory) -> str:
    return build_gpu_checkpoint(str(tmp_path_factory.mktemp("gpu-qwen3")))


def run(path: str, prompts, **kwargs):
    llm = LLM(path, device="cuda", **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=FIRST_TOKENS * 4, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs]


def compare_until_near_tie(ref, fast, num_tokens: int) -> tuple[float, int, int]:
    """Walk each prompt's tokens; they must agree until the reference's top two candidates are closer
    than what bf16 can resolve (NEAR_TIE), after which the sequences may legitimately part. Returns the
    worst |logprob difference| seen before any parting, the number of prompts that parted, and the
    number of tokens compared."""
    worst, parted, compared = 0.0, 0, 0
    for r, f in zip(ref, fast):
        for step in range(num_tokens):
            ranked = sorted(r.logprobs[step].values(), key=lambda lp: -lp.logprob)
            for tok, lp in r.logprobs[step].items():
                if tok in f.logprobs[step]:
                    worst = max(worst, abs(f.logprobs[step][tok].logprob - lp.logprob))
            compared += 1
            if f.token_ids[step] != r.token_ids[step]:
                gap = ranked[0].logprob - ranked[1].logprob
                assert gap < NEAR_TIE, f"token {step} differs although the reference leads by {gap:.3f}"
                parted += 1
                break
    return worst, parted, compared


def test_triton_bf16_with_cuda_graphs_matches_float32_torch_reference(gpu_checkpoint):
    prompts = prompts_of_lengths(LENGTHS, seed=3)
    ref = run(gpu_checkpoint, prompts, dtype="float32", kernel_backend="torch", enforce_eager=True)
    fast = run(gpu_checkpoint, prompts, dtype="bfloat16", kernel_backend="triton")
    worst, parted, compared = compare_until_near_tie(ref, fast, FIRST_TOKENS * 2)
    print(f"bf16 Triton+graphs vs fp32 torch_ref: max |logprob diff| {worst:.4f} over {compared} tokens; "
          f"{parted}/{len(prompts)} prompts parted at a near tie")
    assert worst < LOGPROB_TOL
    assert parted <= len(prompts) // 2


def test_triton_float32_matches_torch_reference_tokens(gpu_checkpoint):
    prompts = prompts_of_lengths(LENGTHS, seed=4)
    ref = run(gpu_checkpoint, prompts, dtype="float32", kernel_backend="torch", enforce_eager=True)
    fast = run(gpu_checkpoint, prompts, dtype="float32", kernel_backend="triton")
    for r, f in zip(ref, fast):
        assert f.token_ids[:8] == r.token_ids[:8]


def test_cuda_graphs_give_the_same_tokens_as_eager(gpu_checkpoint):
    prompts = prompts_of_lengths(LENGTHS * 3, seed=5)  # 21 requests: a padded graph batch size
    eager = run(gpu_checkpoint, prompts, dtype="bfloat16", enforce_eager=True)
    graphs = run(gpu_checkpoint, prompts, dtype="bfloat16")
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


def test_pdl_launches_give_bitwise_the_same_results(gpu_checkpoint):
    # Programmatic dependent launch only changes when kernels start: tokens and logprobs must be bit
    # for bit those of plain launches, at batch 1 (the GEMV path) and in padded graph batches.
    from carpool.ops.triton import utils as triton_utils

    if not triton_utils.pdl_supported(torch.device("cuda")):
        pytest.skip("PDL needs compute capability 9.0 or newer")
    prompts = prompts_of_lengths(LENGTHS * 3, seed=7)
    results = {}
    for disable_pdl in (False, True):
        llm = LLM(gpu_checkpoint, device="cuda", dtype="bfloat16", pdl=not disable_pdl)
        assert triton_utils.pdl() is not disable_pdl
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
        outs = [llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0]]
        outs += llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[disable_pdl] = [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in step.items()}
                                                          for step in o.outputs[0].logprobs]) for o in outs]
        del llm
        torch.cuda.empty_cache()
    assert results[False] == results[True]


def test_gpu_kv_cache_is_sized_from_memory_and_chunked_preempted_runs_agree(gpu_checkpoint):
    llm = LLM(gpu_checkpoint, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5)
    assert llm.engine.stats().num_kv_blocks > 1000
    del llm
    torch.cuda.empty_cache()
    # float32 so that only scheduling (chunks, preemption, graphs vs eager) could change the tokens
    prompts = prompts_of_lengths(LENGTHS, seed=6)
    base = run(gpu_checkpoint, prompts, dtype="float32")
    tight = run(gpu_checkpoint, prompts, dtype="float32", num_kv_blocks=60, max_num_batched_tokens=64)
    for a, b in zip(base, tight):
        assert a.token_ids[:8] == b.token_ids[:8]
