"""The fused Triton MoE (ops/triton/moe.py) against its torch reference (ops/torch_ref/moe.py).

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py), on tiny shapes with 16-wide
tiles so that every loop runs several steps; outputs start as NaN, so an element no kernel writes fails.
Both paths are checked: the grouped GEMM over pairs sorted by expert, and the per-pair GEMV of small
batches (forced by `small_batch_max_tokens`).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from triton_cases import DEVICE, gpu, poison_outputs, qwen3_moe_step  # noqa: E402

from carpool.layers.moe import Routing  # noqa: E402
from carpool.ops.torch_ref import moe as ref  # noqa: E402
from carpool.ops.triton import moe as fm  # noqa: E402

HIDDEN, INTER = 48, 24  # neither a multiple of the 16-wide tiles, each spanning several
GROUPED = fm.FusedMoeConfig(small_batch_max_tokens=0,
                            gemm=fm.GroupedGemmConfig(block_m=16, block_n=16, block_k=16, group_m=2))
GEMV = fm.FusedMoeConfig(small_batch_max_tokens=1 << 30, gemv_block_n=4)
PATHS = [pytest.param(GROUPED, id="grouped"), pytest.param(GEMV, id="gemv")]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_outputs(monkeypatch)


def experts(num_experts: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    return w13.to(dtype).to(DEVICE), w2.to(dtype).to(DEVICE)


def routed(logits: torch.Tensor, top_k: int, dtype: torch.dtype = torch.float32, seed: int = 1
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, topk_weights, topk_ids) for tokens with the given router logits (Qwen3-MoE routing)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(logits.shape[0], HIDDEN, generator=gen).to(dtype).to(DEVICE)
    weights, ids = Routing.qwen_moe(logits.shape[1], top_k, True).select(logits.to(DEVICE))
    return hidden, weights, ids


def check(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
          config: fm.FusedMoeConfig, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    expected = ref.fused_moe(hidden.float(), w13.float(), w2.float(), weights.float(), ids)
    out = fm.fused_moe(hidden, w13, w2, weights, ids, config)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    assert not out.isnan().any(), "some output elements were never written"
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


def random_logits(num_tokens: int, num_experts: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(5, 8, 2), (23, 8, 3), (9, 16, 4)])
def test_alignment_kernels_equal_their_torch_twin(num_tokens: int, num_experts: int, top_k: int) -> None:
    """Token counts whose pairs fill no whole block; the sorted order, block experts and padded count
    are those of the torch twin (a stable sort by expert, each segment padded to the block)."""
    _, _, ids = routed(random_logits(num_tokens, num_experts), top_k)
    sorted_ids, expert_ids, num_padded = fm.moe_align_block_size(ids, num_experts, 16)
    want_sorted, want_experts, want_padded = ref.moe_align_block_size(ids, num_experts, 16)
    n = int(want_padded.item())
    assert int(num_padded.item()) == n and n % 16 == 0
    assert torch.equal(sorted_ids[:n].cpu(), want_sorted[:n].cpu())
    assert torch.equal(expert_ids[:n // 16].cpu(), want_experts[:n // 16].cpu())


def test_alignment_uses_several_counting_programs() -> None:
    """Enough pairs (2 * 64 * 3 = 384) that the counting and scattering kernels split them into ranges;
    pairs of one expert from different ranges still come out in increasing order."""
    _, _, ids = routed(random_logits(2 * fm.ALIGN_CHUNK, 4), top_k=3)
    sorted_ids, _, num_padded = fm.moe_align_block_size(ids, 4, 16)
    want_sorted, _, want_padded = ref.moe_align_block_size(ids, 4, 16)
    n = int(want_padded.item())
    assert int(num_padded.item()) == n
    assert torch.equal(sorted_ids[:n].cpu(), want_sorted[:n].cpu())


@pytest.mark.parametrize("config", PATHS)
def test_uneven_expert_loads_match_reference(config: fm.FusedMoeConfig) -> None:
    # Expert 0 is every token's first choice, expert 1 most tokens' second: long and short segments.
    num_tokens = 4 if config is GEMV else 21
    logits = random_logits(num_tokens, 8)
    logits[:, 0] += 10.0
    logits[: num_tokens - 2, 1] += 5.0
    hidden, weights, ids = routed(logits, top_k=2)
    assert (ids == 0).sum() == num_tokens
    check(hidden, *experts(8), weights, ids, config)


@pytest.mark.parametrize("config", PATHS)
def test_experts_without_tokens_are_never_read(config: fm.FusedMoeConfig) -> None:
    """Experts 5..7 get no token; their weights are NaN, which would poison any output that read them."""
    num_tokens = 3 if config is GEMV else 17
    logits = random_logits(num_tokens, 8)
    logits[:, 5:] = -1e9
    hidden, weights, ids = routed(logits, top_k=2)
    w13, w2 = experts(8)
    expected = ref.fused_moe(hidden, w13, w2, weights, ids)
    w13[5:], w2[5:] = float("nan"), float("nan")
    out = fm.fused_moe(hidden, w13, w2, weights, ids, config)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", PATHS)
def test_tied_routing_matches_reference(config: fm.FusedMoeConfig) -> None:
    # All logits equal for the first tokens, pairwise equal for the rest: ties decide the experts.
    num_tokens = 4 if config is GEMV else 19
    logits = random_logits(num_tokens, 8)
    logits[:2] = 0.0
    logits[:, 4:] = logits[:, :4]
    hidden, weights, ids = routed(logits, top_k=3)
    check(hidden, *experts(8), weights, ids, config)


@pytest.mark.parametrize("config", PATHS)
def test_batch_of_one_token_matches_reference(config: fm.FusedMoeConfig) -> None:
    hidden, weights, ids = routed(random_logits(1, 16), top_k=4)
    check(hidden, *experts(16), weights, ids, config)


def test_default_config_sends_a_single_token_to_the_gemv_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_alignment(*args, **kwargs):
        raise AssertionError("a batch of one token was sorted for the grouped GEMM")
    monkeypatch.setattr(fm, "moe_align_block_size", no_alignment)
    hidden, weights, ids = routed(random_logits(1, 8), top_k=2)
    check(hidden, *experts(8), weights, ids, config=fm.default_moe_config(1, 2, 8))


@pytest.mark.parametrize("block_m", [16, 32])
def test_token_counts_off_the_block_size_match_reference(block_m: int) -> None:
    # 13 tokens * 3 = 39 pairs over 8 experts: no segment is a whole number of blocks.
    config = fm.FusedMoeConfig(small_batch_max_tokens=0,
                               gemm=fm.GroupedGemmConfig(block_m=block_m, block_n=16, block_k=32, group_m=3))
    hidden, weights, ids = routed(random_logits(13, 8), top_k=3)
    check(hidden, *experts(8), weights, ids, config)


@pytest.mark.parametrize("config", PATHS)
def test_float16_matches_reference_within_rounding(config: fm.FusedMoeConfig) -> None:
    num_tokens = 2 if config is GEMV else 11
    hidden, weights, ids = routed(random_logits(num_tokens, 8), top_k=2, dtype=torch.float16)
    check(hidden, *experts(8, torch.float16), weights.to(torch.float16), ids, config, atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("config", PATHS)
def test_float16_with_float32_routing_weights_matches_reference_within_rounding(config: fm.FusedMoeConfig) -> None:
    """Mixtral keeps its routing weights in float32 in a half-precision model (Routing.mixtral)."""
    num_tokens = 2 if config is GEMV else 11
    hidden, _, _ = routed(random_logits(num_tokens, 8), top_k=2, dtype=torch.float16)
    weights, ids = Routing.mixtral(8, 2).select(random_logits(num_tokens, 8).to(torch.float16).to(DEVICE))
    assert weights.dtype == torch.float32
    check(hidden, *experts(8, torch.float16), weights, ids, config, atol=3e-3, rtol=3e-3)


# ---- expert parallelism: one rank's whole experts, global routing ids --------------------------------

def test_alignment_of_one_ranks_experts_equals_its_torch_twin() -> None:
    """The second of two ranks (experts 4..7 of 8): its pairs sorted into four segments of local ids,
    the pairs of experts 0..3 left out, exactly as the torch twin sorts them."""
    _, _, ids = routed(random_logits(23, 8), top_k=3)
    sorted_ids, expert_ids, num_padded = fm.moe_align_block_size(ids, 4, 16, expert_start=4)
    want_sorted, want_experts, want_padded = ref.moe_align_block_size(ids, 4, 16, expert_start=4)
    n = int(want_padded.item())
    held = sorted(int(p) for p in torch.nonzero(ids.flatten().cpu() >= 4).flatten())
    assert int(num_padded.item()) == n
    assert sorted(int(p) for p in want_sorted[:n] if p < ids.numel()) == held
    assert torch.equal(sorted_ids[:n].cpu(), want_sorted[:n].cpu())
    assert torch.equal(expert_ids[:n // 16].cpu(), want_experts[:n // 16].cpu())


@pytest.mark.parametrize("config", PATHS)
def test_expert_parallel_shards_match_reference_and_sum_to_the_whole(config: fm.FusedMoeConfig) -> None:
    """Two ranks holding experts 0..3 and 4..7: each rank's result equals the torch reference's for its
    shard (outputs poisoned with NaN: a pair held elsewhere must neither be read nor leak into the sum),
    and the two partial sums add up to the single-rank result."""
    num_tokens = 3 if config is GEMV else 21
    hidden, weights, ids = routed(random_logits(num_tokens, 8), top_k=3)
    w13, w2 = experts(8)
    shards = []
    for start in (0, 4):
        local = (w13[start:start + 4].contiguous(), w2[start:start + 4].contiguous())
        expected = ref.fused_moe(hidden, *local, weights, ids, expert_start=start, num_global_experts=8)
        out = fm.fused_moe(hidden, *local, weights, ids, config, expert_start=start, num_global_experts=8)
        assert not out.isnan().any()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        shards.append(expected)
    torch.testing.assert_close(shards[0] + shards[1], ref.fused_moe(hidden, w13, w2, weights, ids),
                               atol=1e-5, rtol=1e-5)


def test_expert_range_outside_the_model_is_refused() -> None:
    hidden, weights, ids = routed(random_logits(3, 8), top_k=2)
    w13, w2 = experts(8)
    with pytest.raises(ValueError, match="expert_start=6 must lie within num_global_experts=8"):
        fm.fused_moe(hidden, w13[:4], w2[:4], weights, ids, expert_start=6, num_global_experts=8)


def test_fused_moe_rejects_mismatched_routing_shapes() -> None:
    hidden, weights, ids = routed(random_logits(3, 8), top_k=2)
    with pytest.raises(ValueError, match="topk_ids"):
        fm.fused_moe(hidden, *experts(8), weights, ids[:2])


def test_grouped_gemm_config_rejects_tiles_tl_dot_cannot_take() -> None:
    with pytest.raises(ValueError, match="block_m"):
        fm.GroupedGemmConfig(block_m=8)


# ---- GPU: bf16, the real shape's tiles, CUDA graphs ----------------------------------------------------

@gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 256, 1000])
def test_gpu_bf16_qwen3_moe_shape_matches_reference(num_tokens: int) -> None:
    w13, w2, hidden, weights, ids = qwen3_moe_step(num_tokens, seed=0)
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    expected = ref.fused_moe(hidden.float(), w13.float(), w2.float(), weights, ids)
    out = fm.fused_moe(hidden, w13, w2, weights.bfloat16(), ids)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("num_tokens", [2, 48])
def test_gpu_graph_replay_follows_new_routing(num_tokens: int) -> None:
    """A captured step reads the routing on the device: replaying it after new ids and weights are copied
    in gives the new result (no sizes were baked in from the first routing)."""
    w13, w2 = experts(8)
    hidden, weights, ids = routed(random_logits(num_tokens, 8), top_k=2)
    fm.fused_moe(hidden, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fm.fused_moe(hidden, w13, w2, weights, ids)
    logits = random_logits(num_tokens, 8, seed=7)
    logits[:, 3] += 10.0  # a different, uneven load
    _, new_weights, new_ids = routed(logits, top_k=2)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    torch.testing.assert_close(out, ref.fused_moe(hidden, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


@gpu
@pytest.mark.parametrize("num_tokens", [1, 3, 64, 256])
def test_gpu_expert_parallel_shards_replayed_in_graphs_sum_to_the_whole(num_tokens: int) -> None:
    """The Qwen3-30B-A3B expert shape over two ranks' shards (64 whole experts each), bf16, each shard's
    op captured in a CUDA graph: each matches the float32 reference of its shard, and the two add up to
    the reference of all 128 experts."""
    w13, w2, hidden, weights, ids = qwen3_moe_step(num_tokens, seed=1)
    w13, w2, e = w13.bfloat16(), w2.bfloat16(), w13.shape[0]
    shards = []
    for start in (0, e // 2):
        local = (w13[start:start + e // 2], w2[start:start + e // 2])
        kwargs = dict(expert_start=start, num_global_experts=e)
        fm.fused_moe(hidden, *local, weights.bfloat16(), ids, **kwargs)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fm.fused_moe(hidden, *local, weights.bfloat16(), ids, **kwargs)
        graph.replay()
        expected = ref.fused_moe(hidden.float(), local[0].float(), local[1].float(), weights, ids, **kwargs)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
        shards.append(out.float())
    whole = ref.fused_moe(hidden.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(shards[0] + shards[1], whole, atol=3e-2, rtol=3e-2)


def test_moe_benchmark_counts_each_chosen_expert_once() -> None:
    """benchmarks/bench_moe.py's roofline bytes: two tokens sharing one of their experts read 3 experts."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import bench_moe

    ids = torch.tensor([[4, 9], [9, 2]])
    h, i = 8, 4
    assert bench_moe.step_bytes(ids, h, i, dtype_bytes=2) == 3 * (3 * h * i * 2) + 2 * 2 * h * 2
