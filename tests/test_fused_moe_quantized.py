"""The fused Triton MoE on quantized experts (ops/triton/moe.py, `scales`) against the torch reference,
which dequantizes each chosen expert and multiplies (ops/torch_ref/moe.py): FP8 experts (ExpertScales,
per 128x128 block or per channel) and 4-bit experts (Int4ExpertScales, with zero points or symmetric).

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py). The expert shape puts
quantization boundaries inside every tile: hidden 160 and intermediate 144 are one whole 128-block and a
partial one, so gate and up rows each end in a partial FP8 block (and never share a scale), and w2's rows
and columns cross a block too; 4-bit groups of 16 columns change four times in each 64-column k step of
the grouped GEMM and many times in a GEMV's row. Outputs start as NaN, so an element no kernel writes
fails.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from triton_cases import DEVICE, gpu, poison_outputs, qwen3_moe_step

from carpool.layers.moe import Routing
from carpool.ops.torch_ref import moe as ref
from carpool.ops.torch_ref.moe import ExpertScales, Int4ExpertScales, QuantizedExperts
from carpool.ops.triton import moe as fm
from carpool.quantization.moe_methods import quantize_fp8_experts, quantize_int4_experts

HIDDEN, INTER = 160, 144
INT4_GROUP = 16
# 64-wide k steps (two per 128-column scale block) and 64-column tiles that straddle the row blocks
GROUPED = fm.FusedMoeConfig(small_batch_max_tokens=0,
                            gemm=fm.GroupedGemmConfig(block_m=16, block_n=64, block_k=64, group_m=2))
GEMV = fm.FusedMoeConfig(small_batch_max_tokens=1 << 30, gemv_block_n=16)
PATHS = [pytest.param(GROUPED, id="grouped"), pytest.param(GEMV, id="gemv")]
KINDS = ["fp8-block", "fp8-channel", "int4", "int4-sym"]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_outputs(monkeypatch)


def quantize(w13: torch.Tensor, w2: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts]:
    """Experts quantized as a checkpoint stores them, each projection (gate, up, down) on its own: FP8 per
    128x128 block or per output channel, or 4 bits min-max per group of input columns (zero points
    unless -sym)."""
    if kind.startswith("fp8"):
        return quantize_fp8_experts(w13, w2, kind == "fp8-block")
    return quantize_int4_experts(w13, w2, INT4_GROUP, symmetric=kind == "int4-sym")


def on_device(scales: QuantizedExperts, rows: slice = slice(None)) -> QuantizedExperts:
    """The scales (and zeros) of experts `rows`, on DEVICE."""
    return dataclasses.replace(scales, **{f.name: getattr(scales, f.name)[rows].contiguous().to(DEVICE)
                                          for f in dataclasses.fields(scales)
                                          if isinstance(getattr(scales, f.name), torch.Tensor)})


def quantized_experts(num_experts: int, kind: str, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    q13, q2, scales = quantize(w13, w2, kind)
    return q13.to(DEVICE), q2.to(DEVICE), on_device(scales)


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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", PATHS)
def test_quantized_experts_with_uneven_loads_match_the_dequantizing_reference(config, kind: str) -> None:
    num_tokens = 3 if config is GEMV else 21
    logits = random_logits(num_tokens, 8)
    logits[:, 0] += 10.0  # every token's first choice: a long segment beside short ones
    hidden, weights, ids = routed(logits, top_k=2)
    check(hidden, *quantized_experts(8, kind), weights, ids, config)


@pytest.mark.parametrize("kind", ["fp8-block", "int4"])
@pytest.mark.parametrize("config", PATHS)
def test_quantized_experts_without_tokens_are_never_read(config, kind: str) -> None:
    """Experts 5..7 get no token; their e4m3 values, scales and zeros are NaN, which would poison any
    output that read them (packed int4 words cannot be NaN: their scales and zeros are)."""
    num_tokens = 2 if config is GEMV else 17
    logits = random_logits(num_tokens, 8)
    logits[:, 5:] = -1e9
    hidden, weights, ids = routed(logits, top_k=2)
    w13, w2, scales = quantized_experts(8, kind)
    expected = ref.fused_moe(hidden, w13, w2, weights, ids, scales=scales)
    for t in (w13, w2, *(getattr(scales, f.name) for f in dataclasses.fields(scales))):
        if isinstance(t, torch.Tensor) and t.dtype != torch.int32:
            t[5:] = float("nan")
    out = fm.fused_moe(hidden, w13, w2, weights, ids, config, scales=scales)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["fp8-block", "fp8-channel", "int4"])
def test_quantized_batch_of_one_takes_the_gemv_path_and_matches_reference(monkeypatch, kind: str) -> None:
    """A decode step of one token reads its 4 experts' rows directly (no sort), as the default config says."""
    def no_alignment(*args, **kwargs):
        raise AssertionError("a batch of one token was sorted for the grouped GEMM")
    monkeypatch.setattr(fm, "moe_align_block_size", no_alignment)
    hidden, weights, ids = routed(random_logits(1, 8), top_k=4)
    config = fm.default_moe_config(1, 4, 8)
    assert config.small_batch_max_tokens >= 1
    # (16 rows per program instead of 2: fewer programs for the interpreter, the same path)
    check(hidden, *quantized_experts(8, kind), weights, ids, dataclasses.replace(config, gemv_block_n=16))


@pytest.mark.parametrize("kind", ["fp8-block", "int4"])
@pytest.mark.parametrize("config", PATHS)
def test_quantized_expert_parallel_shard_matches_reference(config, kind: str) -> None:
    """The second of two ranks (experts 4..7 of 8, with their scales): pairs of experts held elsewhere
    are left out, as the reference leaves them out."""
    num_tokens = 3 if config is GEMV else 13
    hidden, weights, ids = routed(random_logits(num_tokens, 8), top_k=3)
    w13, w2, scales = quantized_experts(8, kind)
    check(hidden, w13[4:].contiguous(), w2[4:].contiguous(), on_device(scales, slice(4, None)), weights, ids, config,
          expert_start=4, num_global_experts=8)


def test_int4_experts_with_one_group_per_row_read_their_group_sizes_from_the_scales() -> None:
    """Per-channel 4-bit experts (GPTQ group -1; a tensor-parallel rank's w2 then has one group of its
    own I / N columns): w13's group is the whole hidden dim, w2's the whole intermediate one, both read
    from the shapes of the scales."""
    hidden, weights, ids = routed(random_logits(5, 8), top_k=2)
    gen = torch.Generator().manual_seed(3)
    w13 = torch.randn(8, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(8, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    p13, p2, scales = quantize_int4_experts(w13, w2, (HIDDEN, INTER), symmetric=False)
    assert scales.group_sizes(p13, p2) == (HIDDEN, INTER)
    for config in (GROUPED, GEMV):
        check(hidden, p13.to(DEVICE), p2.to(DEVICE), on_device(scales), weights, ids, config)


def test_fp8_scales_of_the_wrong_shape_are_refused() -> None:
    hidden, weights, ids = routed(random_logits(2, 8), top_k=2)
    w13, w2, scales = quantized_experts(8, "fp8-block")
    wrong = ExpertScales(scales.w13[:, :2], scales.w2, True)  # the up projection's row blocks missing
    with pytest.raises(ValueError, match="block scales must be w13 \\[8, 4, 2\\]"):
        fm.fused_moe(hidden, w13, w2, weights, ids, scales=wrong)


def test_int4_scales_of_the_wrong_shape_are_refused() -> None:
    hidden, weights, ids = routed(random_logits(2, 8), top_k=2)
    w13, w2, s = quantized_experts(8, "int4")
    wrong = Int4ExpertScales(s.w13[:, :, :3], s.w2, s.w13_zeros, s.w2_zeros)  # 3 groups do not divide 160 columns
    with pytest.raises(ValueError, match=r"int4 w13 scales must be \[8, 288, K/G\]"):
        fm.fused_moe(hidden, w13, w2, weights, ids, scales=wrong)


def _bench_moe():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_moe
    return bench_moe


def test_moe_benchmark_counts_one_byte_per_fp8_weight_and_the_scales() -> None:
    """benchmarks/bench_moe.py --fp8: two tokens sharing one of their experts read 3 experts' e4m3 weights,
    their float32 scales (per 128x128 block of gate, up and down; or 2I + H per channel) and the bf16
    hidden rows in and out."""
    bench_moe = _bench_moe()
    ids = torch.tensor([[4, 9], [9, 2]])
    h, i = 256, 192  # 2 x 2 blocks of hidden x intermediate (the second intermediate block partial)
    io = 2 * 2 * h * 2
    assert bench_moe.fp8_step_bytes(ids, h, i, block=True) == 3 * (3 * h * i + 3 * 2 * 2 * 4) + io
    assert bench_moe.fp8_step_bytes(ids, h, i, block=False) == 3 * (3 * h * i + (2 * i + h) * 4) + io


def test_moe_benchmark_counts_half_a_byte_per_int4_weight_and_the_group_scales() -> None:
    """benchmarks/bench_moe.py --int4: the same two tokens read 3 experts' packed weights (half a byte
    each), a bf16 scale (and zero) per group of 128 input columns of every row of gate, up and down, and
    the hidden rows."""
    bench_moe = _bench_moe()
    ids = torch.tensor([[4, 9], [9, 2]])
    h, i = 256, 384
    io = 2 * 2 * h * 2
    groups = 2 * i * (h // 128) + h * (i // 128)
    assert bench_moe.int4_step_bytes(ids, h, i, group=128, zeros=True) == 3 * (3 * h * i // 2 + groups * 2 * 2) + io
    assert bench_moe.int4_step_bytes(ids, h, i, group=128, zeros=False) == 3 * (3 * h * i // 2 + groups * 2) + io


# ---- GPU: bf16 activations, the Qwen3-30B-A3B expert shape, CUDA graphs ----------------------------------

def qwen3_quantized_step(num_tokens: int, kind: str, seed: int) -> tuple[torch.Tensor, ...]:
    """(w13, w2, scales, hidden, topk_weights, topk_ids): triton_cases.qwen3_moe_step with the experts
    quantized per projection as a checkpoint is (Qwen3-30B-A3B-FP8: 128x128 blocks; llm-compressor
    FP8_DYNAMIC: per channel; AWQ: 4 bits, group 128, zero points, bf16 scales)."""
    w13, w2, hidden, weights, ids = qwen3_moe_step(num_tokens, seed)
    if kind.startswith("fp8"):
        return *quantize_fp8_experts(w13, w2, kind == "fp8-block"), hidden, weights, ids
    return *quantize_int4_experts(w13.bfloat16(), w2.bfloat16(), 128, symmetric=False), hidden, weights, ids


@gpu
@pytest.mark.parametrize("kind", ["fp8-block", "fp8-channel", "int4"])
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 256, 1000])
def test_gpu_bf16_quantized_qwen3_moe_shape_matches_reference(num_tokens: int, kind: str) -> None:
    w13, w2, scales, hidden, weights, ids = qwen3_quantized_step(num_tokens, kind, seed=0)
    expected = ref.fused_moe(hidden.float(), w13, w2, weights, ids, scales=scales)
    out = fm.fused_moe(hidden, w13, w2, weights.bfloat16(), ids, scales=scales)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("kind", ["fp8-block", "int4"])
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_gpu_quantized_expert_parallel_shards_replayed_in_graphs_sum_to_the_whole(num_tokens: int, kind: str) -> None:
    """Two ranks' shards of quantized experts (64 whole experts each, with their scales), each op captured
    in a CUDA graph: each matches its shard's float32 reference, and they add up to the whole."""
    w13, w2, scales, hidden, weights, ids = qwen3_quantized_step(num_tokens, kind, seed=1)
    shards = []
    for start in (0, 64):
        local = (w13[start:start + 64], w2[start:start + 64])
        shard = on_device(scales, slice(start, start + 64))
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
