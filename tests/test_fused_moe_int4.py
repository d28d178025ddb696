"""The fused Triton MoE on 4-bit experts (ops/triton/moe.py, `scales` an Int4ExpertScales) against the torch
reference, which dequantizes each chosen expert and multiplies (ops/torch_ref/moe.py).

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py). Groups of 32 columns put
group boundaries inside every k step (the grouped GEMM's 64-column steps span two groups, the GEMVs'
whole rows five and three); hidden 160 and intermediate 96 fill no 64-column tile. Outputs start as NaN,
so an element no kernel writes fails.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")

from carpool.layers.moe import Routing  # noqa: E402
from carpool.ops.torch_ref import moe as ref  # noqa: E402
from carpool.ops.torch_ref.moe import Int4ExpertScales  # noqa: E402
from carpool.ops.triton import moe as fm  # noqa: E402
from carpool.ops.triton import utils  # noqa: E402
from carpool.quantization.moe_methods import quantize_int4_experts  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
gpu = pytest.mark.gpu

HIDDEN, INTER, GROUP = 160, 96, 32
GROUPED = fm.FusedMoeConfig(small_batch_max_tokens=0,
                            gemm=fm.GroupedGemmConfig(block_m=16, block_n=64, block_k=64, group_m=2))
GEMV = fm.FusedMoeConfig(small_batch_max_tokens=1 << 30, gemv_block_n=16)
PATHS = [pytest.param(GROUPED, id="grouped"), pytest.param(GEMV, id="gemv")]
ZEROS = [pytest.param(False, id="zeros"), pytest.param(True, id="symmetric")]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(utils, "empty_output", poisoned)


def int4_experts(num_experts: int, symmetric: bool, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, Int4ExpertScales]:
    """Random experts quantized as a checkpoint stores them: each projection (gate, up, down) min-max per
    group of 32 input columns on its own, with zero points unless symmetric, then stacked."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    p13, p2, s = quantize_int4_experts(w13, w2, GROUP, symmetric)
    moved = [t.to(DEVICE) if t is not None else None for t in (s.w13, s.w2, s.w13_zeros, s.w2_zeros)]
    return p13.to(DEVICE), p2.to(DEVICE), Int4ExpertScales(*moved)


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
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    return out


@pytest.mark.parametrize("symmetric", ZEROS)
@pytest.mark.parametrize("config", PATHS)
def test_int4_experts_with_uneven_loads_match_the_dequantizing_reference(config, symmetric: bool) -> None:
    num_tokens = 3 if config is GEMV else 21
    logits = random_logits(num_tokens, 8)
    logits[:, 0] += 10.0  # every token's first choice: a long segment beside short ones
    hidden, weights, ids = routed(logits, top_k=2)
    check(hidden, *int4_experts(8, symmetric), weights, ids, config)


@pytest.mark.parametrize("config", PATHS)
def test_int4_experts_without_tokens_are_never_read(config) -> None:
    """Experts 5..7 get no token; their scales and zeros are NaN, which would poison any output that
    read them."""
    num_tokens = 2 if config is GEMV else 17
    logits = random_logits(num_tokens, 8)
    logits[:, 5:] = -1e9
    hidden, weights, ids = routed(logits, top_k=2)
    w13, w2, scales = int4_experts(8, symmetric=False)
    expected = ref.fused_moe(hidden, w13, w2, weights, ids, scales=scales)
    for t in (scales.w13, scales.w2, scales.w13_zeros, scales.w2_zeros):
        t[5:] = float("nan")
    out = fm.fused_moe(hidden, w13, w2, weights, ids, config, scales=scales)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_int4_batch_of_one_takes_the_gemv_path_and_matches_reference(monkeypatch) -> None:
    """A decode step of one token reads its 4 experts' packed rows directly (no sort), as the default
    config says."""
    def no_alignment(*args, **kwargs):
        raise AssertionError("a batch of one token was sorted for the grouped GEMM")
    monkeypatch.setattr(fm, "moe_align_block_size", no_alignment)
    hidden, weights, ids = routed(random_logits(1, 8), top_k=4)
    config = fm.default_moe_config(1, 4, 8)
    assert config.small_batch_max_tokens >= 1
    # (16 rows per program instead of 2: fewer programs for the interpreter, the same path)
    check(hidden, *int4_experts(8, symmetric=False), weights, ids, dataclasses.replace(config, gemv_block_n=16))


@pytest.mark.parametrize("config", PATHS)
def test_int4_expert_parallel_shard_matches_reference(config) -> None:
    """The second of two ranks (experts 4..7 of 8, with their scales and zeros): pairs of experts held
    elsewhere are left out, as the reference leaves them out."""
    num_tokens = 3 if config is GEMV else 13
    hidden, weights, ids = routed(random_logits(num_tokens, 8), top_k=3)
    w13, w2, s = int4_experts(8, symmetric=False)
    shard = Int4ExpertScales(*(t[4:].contiguous() for t in (s.w13, s.w2, s.w13_zeros, s.w2_zeros)))
    check(hidden, w13[4:].contiguous(), w2[4:].contiguous(), shard, weights, ids, config, expert_start=4,
          num_global_experts=8)


def test_int4_experts_split_along_the_intermediate_dimension_use_their_own_groups() -> None:
    """A tensor-parallel rank's slice of per-channel experts: w2's one group per row is this rank's 48
    columns (G2 = I_rank), w13's the whole hidden dim, both read from the shapes of the scales."""
    hidden, weights, ids = routed(random_logits(5, 8), top_k=2)
    gen = torch.Generator().manual_seed(3)
    w13 = torch.randn(8, 2 * 48, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(8, HIDDEN, 48, generator=gen) / 48 ** 0.5
    p13, p2, s = quantize_int4_experts(w13, w2, (HIDDEN, 48), symmetric=False)
    scales = Int4ExpertScales(*(t.to(DEVICE) for t in (s.w13, s.w2, s.w13_zeros, s.w2_zeros)))
    assert scales.group_sizes(p13, p2) == (HIDDEN, 48)
    for config in (GROUPED, GEMV):
        check(hidden, p13.to(DEVICE), p2.to(DEVICE), scales, weights, ids, config)


def test_int4_scales_of_the_wrong_shape_are_refused() -> None:
    hidden, weights, ids = routed(random_logits(2, 8), top_k=2)
    w13, w2, s = int4_experts(8, symmetric=False)
    wrong = Int4ExpertScales(s.w13[:, :, :3], s.w2, s.w13_zeros, s.w2_zeros)  # 3 groups do not divide 160 columns
    with pytest.raises(ValueError, match=r"int4 w13 scales must be \[8, 192, K/G\]"):
        fm.fused_moe(hidden, w13, w2, weights, ids, scales=wrong)


def test_moe_benchmark_counts_half_a_byte_per_int4_weight_and_the_group_scales() -> None:
    """benchmarks/bench_moe.py --int4 awq: two tokens sharing one of their experts read 3 experts' packed
    weights (half a byte each), a bf16 scale and zero per group of 128 input columns of every row of
    gate, up and down, and the bf16 hidden rows in and out."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_moe

    ids = torch.tensor([[4, 9], [9, 2]])
    h, i = 256, 384
    io = 2 * 2 * h * 2
    groups = 2 * i * (h // 128) + h * (i // 128)
    assert bench_moe.int4_step_bytes(ids, h, i, group=128, zeros=True) == 3 * (3 * h * i // 2 + groups * 2 * 2) + io
    assert bench_moe.int4_step_bytes(ids, h, i, group=128, zeros=False) == 3 * (3 * h * i // 2 + groups * 2) + io


# ---- GPU: bf16 activations, the Qwen3-30B-A3B expert shape, CUDA graphs ----------------------------------

def qwen3_int4_experts(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Int4ExpertScales]:
    """128 experts of hidden 2048 and intermediate 768 on the GPU, quantized per projection as an AWQ
    checkpoint is (group 128, zero points, bf16 scales)."""
    e, h, i = 128, 2048, 768
    w13 = (torch.randn(e, 2 * i, h, generator=gen, device="cuda") / h ** 0.5).bfloat16()
    w2 = (torch.randn(e, h, i, generator=gen, device="cuda") / i ** 0.5).bfloat16()
    return quantize_int4_experts(w13, w2, 128, symmetric=False)


@gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 256, 1000])
def test_gpu_bf16_int4_qwen3_moe_shape_matches_reference(num_tokens: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13, w2, scales = qwen3_int4_experts(gen)
    hidden = torch.randn(num_tokens, 2048, generator=gen, device="cuda").bfloat16()
    weights, ids = Routing.qwen_moe(128, 8, True).select(torch.randn(num_tokens, 128, generator=gen, device="cuda"))
    expected = ref.fused_moe(hidden.float(), w13, w2, weights, ids, scales=scales)
    out = fm.fused_moe(hidden, w13, w2, weights.bfloat16(), ids, scales=scales)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_gpu_int4_expert_parallel_shards_replayed_in_graphs_sum_to_the_whole(num_tokens: int) -> None:
    """Two ranks' shards of AWQ-like experts (64 whole experts each, with their scales and zeros), each op
    captured in a CUDA graph: each matches its shard's float32 reference, and they add up to the whole."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    w13, w2, s = qwen3_int4_experts(gen)
    hidden = torch.randn(num_tokens, 2048, generator=gen, device="cuda").bfloat16()
    weights, ids = Routing.qwen_moe(128, 8, True).select(torch.randn(num_tokens, 128, generator=gen, device="cuda"))
    shards = []
    for start in (0, 64):
        local = (w13[start:start + 64], w2[start:start + 64])
        shard = Int4ExpertScales(*(t[start:start + 64] for t in (s.w13, s.w2, s.w13_zeros, s.w2_zeros)))
        kwargs = dict(expert_start=start, num_global_experts=128)
        fm.fused_moe(hidden, *local, weights.bfloat16(), ids, scales=shard, **kwargs)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fm.fused_moe(hidden, *local, weights.bfloat16(), ids, scales=shard, **kwargs)
        graph.replay()
        expected = ref.fused_moe(hidden.float(), *local, weights, ids, scales=shard, **kwargs)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        shards.append(out.float())
    whole = ref.fused_moe(hidden.float(), w13, w2, weights, ids, scales=s)
    torch.testing.assert_close(shards[0] + shards[1], whole, atol=3e-2, rtol=3e-2)
