"""Routing and the torch expert loop against transformers' own MoE modules (the exactness reference).

The routers and experts are built from transformers' config classes with random weights; carpool must
pick the same experts with bit-identical weights, and its expert loop must give the bit-identical output.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carpool.layers.moe import Routing
from carpool.ops.torch_ref.moe import fused_moe

HIDDEN, EXPERTS, TOP_K = 32, 8, 3


def qwen3_router(norm_topk_prob: bool) -> tuple[nn.Module, Routing]:
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                         norm_topk_prob=norm_topk_prob)
    return Qwen3MoeTopKRouter(cfg), Routing.qwen_moe(EXPERTS, TOP_K, norm_topk_prob)


def qwen2_router(norm_topk_prob: bool) -> tuple[nn.Module, Routing]:
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                         norm_topk_prob=norm_topk_prob)
    return Qwen2MoeTopKRouter(cfg), Routing.qwen_moe(EXPERTS, TOP_K, norm_topk_prob)


def mixtral_router(_: bool) -> tuple[nn.Module, Routing]:
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = MixtralConfig(hidden_size=HIDDEN, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    return MixtralTopKRouter(cfg), Routing.mixtral(EXPERTS, TOP_K)


ROUTERS = [pytest.param(qwen3_router, True, id="qwen3-norm"), pytest.param(qwen3_router, False, id="qwen3"),
           pytest.param(qwen2_router, False, id="qwen2"), pytest.param(qwen2_router, True, id="qwen2-norm"),
           pytest.param(mixtral_router, True, id="mixtral")]


def route_both(make: Callable[[bool], tuple[nn.Module, Routing]], norm: bool, x: torch.Tensor,
               weight: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    hf, ours = make(norm)
    hf = hf.to(x.dtype)
    with torch.no_grad():
        hf.weight.copy_(weight)
        _, hf_weights, hf_ids = hf(x)
    return (hf_weights, hf_ids), ours.select(F.linear(x, weight.to(x.dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make,norm", ROUTERS)
def test_routing_picks_transformers_experts_and_weights(make, norm: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, HIDDEN, generator=gen).to(dtype)
    (hf_w, hf_ids), (w, ids) = route_both(make, norm, x, torch.randn(EXPERTS, HIDDEN, generator=gen))
    assert torch.equal(ids, hf_ids)
    assert w.dtype == hf_w.dtype and torch.equal(w, hf_w)


@pytest.mark.parametrize("make,norm", ROUTERS)
def test_tied_router_logits_pick_the_experts_transformers_picks(make, norm: bool) -> None:
    # Router rows 1..4 are equal, so every token's logits tie on experts 1..4 (and rows 0, 5 tie too):
    # the choice among tied experts is torch.topk's, in carpool as in transformers.
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(EXPERTS, HIDDEN, generator=gen)
    weight[1:5] = weight[1]
    weight[5] = weight[0]
    x = torch.randn(12, HIDDEN, generator=gen)
    x[:4] = 0.0  # all logits tie
    (hf_w, hf_ids), (w, ids) = route_both(make, norm, x, weight)
    assert torch.equal(ids, hf_ids) and torch.equal(w, hf_w)
    assert all(len(set(row)) == TOP_K for row in ids.tolist())


def test_routing_rejects_top_k_above_the_expert_count() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        Routing.mixtral(num_experts=4, top_k=5)


def test_routing_rejects_logits_of_another_expert_count() -> None:
    with pytest.raises(ValueError, match="router_logits"):
        Routing.qwen_moe(8, 2, True).select(torch.zeros(3, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_expert_loop_equals_transformers_experts(dtype: torch.dtype) -> None:
    """The oracle of the Triton kernels is transformers' eager expert loop, bit for bit."""
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=HIDDEN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                         moe_intermediate_size=16)
    experts = Qwen3MoeExperts(cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(EXPERTS, 32, HIDDEN, generator=gen) / HIDDEN ** 0.5)
        experts.down_proj.copy_(torch.randn(EXPERTS, HIDDEN, 16, generator=gen) / 4)
    experts = experts.to(dtype)
    x = torch.randn(9, HIDDEN, generator=gen).to(dtype)
    logits = torch.randn(9, EXPERTS, generator=gen)
    logits[:, 7] = -1e9  # expert 7 gets no token
    weights, ids = Routing.qwen_moe(EXPERTS, TOP_K, True).select(logits.to(dtype))
    with torch.no_grad():
        expected = experts(x, ids, weights)
    assert torch.equal(fused_moe(x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids), expected)
