"""Routing in one Triton kernel before the fused MoE kernels (ops/triton/moe.py `select_experts`,
`fused_moe_routed`) against their torch twins (ops/torch_ref/moe.py), and what a batch-1 MoE block
launches.

The twin is the families' routing (`Routing.select`: float32 softmax over all experts, top-k,
renormalization, the weights' dtype) with one tie rule, equal logits by increasing expert id; the
kernels must pick the same experts in the same order, ties included, and the same weights to float32
rounding. Kernels run in the Triton interpreter on CPU; outputs start as NaN.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from triton_cases import DEVICE, INTERPRET, poison_outputs  # noqa: E402

from carpool.layers.moe import Routing  # noqa: E402
from carpool.ops.torch_ref import moe as ref  # noqa: E402
from carpool.ops.triton import moe as fm  # noqa: E402

HIDDEN, INTER = 48, 24
ROUTINGS = {
    "qwen3_moe": Routing.qwen_moe(10, 3, norm_topk_prob=True),  # renormalized, weights in the logits' dtype
    "qwen2_moe": Routing.qwen_moe(10, 4, norm_topk_prob=False),
    "mixtral": Routing.mixtral(10, 2),  # float32 weights
}
SMALL = fm.FusedMoeConfig(small_batch_max_tokens=4, gemv_block_n=4)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_outputs(monkeypatch)


def tied_logits(num_tokens: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Random logits; token 0 has four equal largest logits, token 1 all equal, the rest two equal pairs."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[0, [7, 2, 9, 4]] = 3.0
    if num_tokens > 1:
        logits[1] = 0.5
    if num_tokens > 2:
        logits[2:, [1, 8]] = 2.0
        logits[2:, [3, 6]] = -1.0
    return logits.to(DEVICE)


def experts(num_experts: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    return w13.to(DEVICE), w2.to(DEVICE)


def hidden_rows(num_tokens: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("family", list(ROUTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routing_kernel_picks_the_twins_experts_with_ties(family: str, dtype: torch.dtype) -> None:
    routing = ROUTINGS[family].kernel_routing
    logits = tied_logits(5, 10).to(dtype)
    weights, ids = fm.select_experts(logits, routing)
    want_weights, want_ids = ref.select_experts(logits, routing)
    assert torch.equal(ids.long(), want_ids)
    assert weights.dtype == want_weights.dtype
    torch.testing.assert_close(weights.float(), want_weights.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", list(ROUTINGS))
def test_routing_twin_is_the_families_routing_without_ties(family: str) -> None:
    routing = ROUTINGS[family]
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    weights, ids = ref.select_experts(logits, routing.kernel_routing)
    want_weights, want_ids = routing.select(logits)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=0, rtol=1e-6)


def test_routing_twin_orders_equal_logits_by_expert_id() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0]])
    _, ids = ref.select_experts(logits, ref.TopKRouting(4, True, False))
    assert ids.tolist() == [[1, 3, 4, 2]]


@pytest.mark.parametrize("family", list(ROUTINGS))
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_small_batch_gemvs_take_the_routing_kernels_choice_as_the_twin(family: str, num_tokens: int) -> None:
    """The routing kernel's ids and weights are returned and used by both expert GEMVs."""
    routing = ROUTINGS[family].kernel_routing
    logits, (w13, w2), hidden = tied_logits(num_tokens, 10), experts(10), hidden_rows(num_tokens)
    out, weights, ids = fm.fused_moe_routed(hidden, logits, w13, w2, routing, SMALL)
    want, want_weights, want_ids = ref.fused_moe_routed(hidden, logits, w13, w2, routing)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-6)
    assert not out.isnan().any(), "some output elements were never written"
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_larger_batches_route_in_one_kernel_then_take_the_grouped_gemm() -> None:
    routing = ROUTINGS["qwen3_moe"].kernel_routing
    logits, (w13, w2), hidden = tied_logits(7, 10), experts(10), hidden_rows(7)
    grouped = fm.FusedMoeConfig(small_batch_max_tokens=4,
                                gemm=fm.GroupedGemmConfig(block_m=16, block_n=16, block_k=16, group_m=2))
    out, _, ids = fm.fused_moe_routed(hidden, logits, w13, w2, routing, grouped)
    want, _, want_ids = ref.fused_moe_routed(hidden, logits, w13, w2, routing)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_expert_parallel_shards_of_a_routed_step_add_up_to_the_whole() -> None:
    """Each rank routes over all experts' logits and computes only its own experts' pairs."""
    routing = ROUTINGS["qwen2_moe"].kernel_routing
    logits, (w13, w2), hidden = tied_logits(2, 10), experts(10), hidden_rows(2)
    shards = [fm.fused_moe_routed(hidden, logits, w13[s:s + 5], w2[s:s + 5], routing, SMALL, expert_start=s,
                                  num_global_experts=10)[0] for s in (0, 5)]
    want, _, _ = ref.fused_moe_routed(hidden, logits, w13, w2, routing)
    torch.testing.assert_close(shards[0] + shards[1], want, atol=1e-5, rtol=1e-5)


def test_fp8_experts_routed_by_the_kernel_give_the_twins_output() -> None:
    from carpool.quantization.moe_methods import quantize_fp8_experts

    routing = ROUTINGS["qwen3_moe"].kernel_routing
    w13, w2, scales = quantize_fp8_experts(*experts(10), block=False)
    logits, hidden = tied_logits(1, 10), hidden_rows(1)
    out, _, ids = fm.fused_moe_routed(hidden, logits, w13, w2, routing, SMALL, scales=scales)
    want, _, want_ids = ref.fused_moe_routed(hidden, logits, w13, w2, routing, scales=scales)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_router_logits_of_the_wrong_width_are_refused() -> None:
    (w13, w2), hidden = experts(10), hidden_rows(1)
    with pytest.raises(ValueError, match="router_logits: expected \\[T=1, num_experts=10\\]"):
        fm.fused_moe_routed(hidden, tied_logits(1, 10)[:, :8], w13, w2, ROUTINGS["mixtral"].kernel_routing)


EXPERT_GEMVS = ["_gemv_kernel", "_moe_gemv_gate_up_kernel", "_moe_gemv_down_kernel"]  # router, gate/up, down
ROUTED_BLOCK = ["_gemv_kernel", "_moe_route_kernel", "_moe_gemv_gate_up_kernel", "_moe_gemv_down_kernel"]


def batch1_block_launches(fused_routing: bool, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """What a batch-1 Qwen3-MoE block in float16 launches (bf16 on a GPU)."""
    from launch_count import count_launches
    from test_moe_models import hf_config_dict

    from carpool.config import KernelConfig, ModelConfig
    from carpool.models.moe import SparseMoeBlock
    from carpool.models.runtime import ModelRuntime

    monkeypatch.undo()  # real allocations (the poisoned ones would count as fill kernels)
    config = ModelConfig.from_hf_config(hf_config_dict("qwen3_moe"), dtype="float16")
    runtime = ModelRuntime.for_inference("triton", kernels=KernelConfig(fused_moe_routing=fused_routing))
    block = SparseMoeBlock(config, runtime, 0)
    torch.manual_seed(0)
    for p in block.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(1, config.hidden_size, dtype=config.dtype)
    with count_launches() as launches:
        block(x)
    return launches


@pytest.mark.skipif(not INTERPRET, reason="counts the interpreter's launches")
def test_batch1_moe_block_with_fused_routing_is_four_triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router GEMV, the routing kernel and the two expert GEMVs, all under PDL on a GPU, and no torch
    kernel."""
    launches = batch1_block_launches(True, monkeypatch)
    assert launches.triton() == ROUTED_BLOCK
    assert launches.torch() == []


@pytest.mark.skipif(not INTERPRET, reason="counts the interpreter's launches")
def test_batch1_moe_block_without_fused_routing_routes_with_torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    launches = batch1_block_launches(False, monkeypatch)
    assert launches.triton() == EXPERT_GEMVS
    assert {"_softmax", "topk", "sum", "div"} <= set(launches.torch())
