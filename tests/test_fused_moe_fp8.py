"""The fused Triton MoE on FP8 experts (ops/triton/moe.py, `scales`) against the torch reference, which
dequantizes each chosen expert and multiplies (ops/torch_ref/moe.py).

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py). The expert shape puts
block-scale boundaries inside every tile: hidden 160 and intermediate 144 are one whole 128-block and a
partial one, so gate and up rows each end in a partial block (and never share a scale), and w2's rows and
columns cross a block too. Outputs start as NaN, so an element no kernel writes fails.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")
from triton_cases import DEVICE, gpu, poison_outputs, qwen3_moe_step  # noqa: E402

from carpool.layers.moe import Routing  # noqa: E402
from carpool.ops.torch_ref import moe as ref  # noqa: E402
from carpool.ops.torch_ref.moe import ExpertScales  # noqa: E402
from carpool.ops.triton import moe as fm  # noqa: E402
from carpool.quantization.moe_methods import quantize_fp8_experts  # noqa: E402

HIDDEN, INTER = 160, 144
# 64-wide k steps (two per 128-column scale block) and 64-column tiles that straddle the row blocks
GROUPED = fm.FusedMoeConfig(small_batch_max_tokens=0,
                            gemm=fm.GroupedGemmConfig(block_m=16, block_n=64, block_k=64, group_m=2))
GEMV = fm.FusedMoeConfig(small_batch_max_tokens=1 << 30, gemv_block_n=16)
PATHS = [pytest.param(GROUPED, id="grouped"), pytest.param(GEMV, id="gemv")]
KINDS = [pytest.param(True, id="block"), pytest.param(False, id="channel")]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_outputs(monkeypatch)


def fp8_experts(num_experts: int, block: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, ExpertScales]:
    """Random experts quantized as a checkpoint stores them: each projection (gate, up, down) on its own,
    per 128x128 block or per output channel, then stacked (gate rows, then up rows)."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    q13, q2, scales = quantize_fp8_experts(w13, w2, block)
    return q13.to(DEVICE), q2.to(DEVICE), ExpertScales(scales.w13.to(DEVICE), scales.w2.to(DEVICE), block)


def routed(logits: torch.Tensor, top_k: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(logits.shape[0], HIDDEN, generator=gen).to(DEVICE)
    weights, ids = Routing.qwen_moe(logits.shape[1], top_k, True).select(logits.to(DEVICE))
    return hidden, weights, ids


def random_logits(num_tokens: int, num_experts: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))


def check(hidden, w13, w2, scales, weights, ids, config, **kwargs) -> torch.Tensor:
    expected = ref.fused_moe(hidden, w13, w2, weights, ids, scales=scales, **kwargs)
    out = fm.fused_moe(hidden, w13, w2, weights, ids, config, scales=scales, **kwargs)
    assert not out.isnan().any(), "some output elements were never written"
    # (the kernels scale sums of products, the reference products of scaled weights: float32 rounding apart)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    return out


@pytest.mark.parametrize("block", KINDS)
@pytest.mark.parametrize("config", PATHS)
def test_fp8_experts_with_uneven_loads_match_the_dequantizing_reference(config, block: bool) -> None:
    num_tokens = 3 if config is GEMV else 21
    logits = random_logits(num_tokens, 8)
    logits[:, 0] += 10.0  # every token's first choice: a long segment beside short ones
    hidden, weights, ids = routed(logits, top_k=2)
    check(hidden, *fp8_experts(8, block), weights, ids, config)


@pytest.mark.parametrize("config", PATHS)
def test_fp8_experts_without_tokens_are_never_read(config) -> None:
    """Experts 5..7 get no token; their e4m3 values and scales are NaN, which would poison any output
    that read them."""
    num_tokens = 2 if config is GEMV else 17
    logits = random_logits(num_tokens, 8)
    logits[:, 5:] = -1e9
    hidden, weights, ids = routed(logits, top_k=2)
    w13, w2, scales = fp8_experts(8, block=True)
    expected = ref.fused_moe(hidden, w13, w2, weights, ids, scales=scales)
    for t in (w13, w2, scales.w13, scales.w2):
        t[5:] = float("nan")
    out = fm.fused_moe(hidden, w13, w2, weights, ids, config, scales=scales)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block", KINDS)
def test_fp8_batch_of_one_takes_the_gemv_path_and_matches_reference(monkeypatch, block: bool) -> None:
    """A decode step of one token reads its 4 experts' rows directly (no sort), as the default config says."""
    def no_alignment(*args, **kwargs):
        raise AssertionError("a batch of one token was sorted for the grouped GEMM")
    monkeypatch.setattr(fm, "moe_align_block_size", no_alignment)
    hidden, weights, ids = routed(random_logits(1, 8), top_k=4)
    config = fm.default_moe_config(1, 4, 8)
    assert config.small_batch_max_tokens >= 1
    # (16 rows per program instead of 2: fewer programs for the interpreter, the same path)
    check(hidden, *fp8_experts(8, block), weights, ids, dataclasses.replace(config, gemv_block_n=16))


@pytest.mark.parametrize("config", PATHS)
def test_fp8_expert_parallel_shard_matches_reference(config) -> None:
    """The second of two ranks (experts 4..7 of 8, with their scales): pairs of experts held elsewhere
    are left out, as the reference leaves them out."""
    num_tokens = 3 if config is GEMV else 13
    hidden, weights, ids = routed(random_logits(num_tokens, 8), top_k=3)
    w13, w2, scales = fp8_experts(8, block=True)
    shard = ExpertScales(scales.w13[4:].contiguous(), scales.w2[4:].contiguous(), True)
    check(hidden, w13[4:].contiguous(), w2[4:].contiguous(), shard, weights, ids, config, expert_start=4,
          num_global_experts=8)


def test_fp8_scales_of_the_wrong_shape_are_refused() -> None:
    hidden, weights, ids = routed(random_logits(2, 8), top_k=2)
    w13, w2, scales = fp8_experts(8, block=True)
    wrong = ExpertScales(scales.w13[:, :2], scales.w2, True)  # the up projection's row blocks missing
    with pytest.raises(ValueError, match="block scales must be w13 \\[8, 4, 2\\]"):
        fm.fused_moe(hidden, w13, w2, weights, ids, scales=wrong)


def test_moe_benchmark_counts_one_byte_per_fp8_weight_and_the_scales() -> None:
    """benchmarks/bench_moe.py --fp8: two tokens sharing one of their experts read 3 experts' e4m3 weights,
    their float32 scales (per 128x128 block of gate, up and down; or 2I + H per channel) and the bf16
    hidden rows in and out."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_moe

    ids = torch.tensor([[4, 9], [9, 2]])
    h, i = 256, 192  # 2 x 2 blocks of hidden x intermediate (the second intermediate block partial)
    io = 2 * 2 * h * 2
    assert bench_moe.fp8_step_bytes(ids, h, i, block=True) == 3 * (3 * h * i + 3 * 2 * 2 * 4) + io
    assert bench_moe.fp8_step_bytes(ids, h, i, block=False) == 3 * (3 * h * i + (2 * i + h) * 4) + io


# ---- GPU: bf16 activations, the Qwen3-30B-A3B expert shape, CUDA graphs ----------------------------------

def qwen3_fp8_step(num_tokens: int, block: bool, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, ExpertScales, torch.Tensor, torch.Tensor, torch.Tensor]:
    """triton_cases.qwen3_moe_step with the experts quantized per projection as a checkpoint is
    (Qwen3-30B-A3B-FP8: 128x128 blocks; llm-compressor FP8_DYNAMIC: per channel)."""
    w13, w2, hidden, weights, ids = qwen3_moe_step(num_tokens, seed)
    return *quantize_fp8_experts(w13, w2, block), hidden, weights, ids


@gpu
@pytest.mark.parametrize("block", KINDS)
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 256, 1000])
def test_gpu_bf16_fp8_qwen3_moe_shape_matches_reference(num_tokens: int, block: bool) -> None:
    w13, w2, scales, hidden, weights, ids = qwen3_fp8_step(num_tokens, block, seed=0)
    expected = ref.fused_moe(hidden.float(), w13, w2, weights, ids, scales=scales)
    out = fm.fused_moe(hidden, w13, w2, weights.bfloat16(), ids, scales=scales)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_gpu_fp8_expert_parallel_shards_replayed_in_graphs_sum_to_the_whole(num_tokens: int) -> None:
    """Two ranks' shards of FP8 block-scaled experts (64 whole experts each, with their scales), each op
    captured in a CUDA graph: each matches its shard's float32 reference, and they add up to the whole."""
    w13, w2, scales, hidden, weights, ids = qwen3_fp8_step(num_tokens, True, seed=1)
    shards = []
    for start in (0, 64):
        local = (w13[start:start + 64], w2[start:start + 64])
        shard = ExpertScales(scales.w13[start:start + 64], scales.w2[start:start + 64], True)
        kwargs = dict(expert_start=start, num_global_experts=128, scales=shard)
        fm.fused_moe(hidden, *local, weights.bfloat16(), ids, **kwargs)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fm.fused_moe(hidden, *local, weights.bfloat16(), ids, **kwargs)
        graph.replay()
        expected = ref.fused_moe(hidden.float(), *local, weights, ids, **kwargs)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        shards.append(out.float())
    whole = ref.fused_moe(hidden.float(), w13, w2, weights, ids, scales=scales)
    torch.testing.assert_close(shards[0] + shards[1], whole, atol=3e-2, rtol=3e-2)
