"""Top-k routing as the Hugging Face families compute it, so that carpool picks the same experts with
the same weights as transformers does (the exactness reference).

All three families (Qwen2-MoE, Qwen3-MoE, Mixtral) take a softmax over *all* experts' router logits in
float32, keep the k largest probabilities with `torch.topk` and optionally divide them by their sum:

- Qwen2-MoE / Qwen3-MoE renormalize only when `norm_topk_prob` is set, and cast the weights back to the
  logits' dtype (bf16 weights for a bf16 model);
- Mixtral always renormalizes (mathematically a softmax over the k chosen logits, computed as above) and
  keeps the weights in float32.

Ties: experts with equal probabilities are ordered exactly as `torch.topk` orders them, because the
selection *is* `torch.topk` on the same float32 probabilities the reference computes; the weights'
order follows the ids'. Everything here is a device op with static shapes (no host sync), so it can be
captured in a CUDA graph.

The Triton backend computes the same routing inside its MoE kernels (`kernel_routing`, KernelConfig's
fused_moe_routing), ordering equal logits by increasing expert id: torch.topk leaves that order
unspecified, so the two may pick different experts only among experts of equal probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carpool.ops.torch_ref.moe import TopKRouting


@dataclass(frozen=True)
class Routing:
    """How a family turns router logits [T, num_experts] into (topk_weights [T, k], topk_ids [T, k]).

    Invariants: 1 <= top_k <= num_experts; `select` returns ids in [0, num_experts), distinct within a
    row, ordered by decreasing probability (ties as `torch.topk`)."""

    num_experts: int
    top_k: int
    renormalize: bool
    # Qwen2/3-MoE: `router_top_value.to(router_logits.dtype)`; Mixtral keeps the float32 weights.
    weights_in_logits_dtype: bool

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok (top_k) must be in [1, {self.num_experts}], got {self.top_k}")

    @staticmethod
    def qwen_moe(num_experts: int, top_k: int, norm_topk_prob: bool) -> Routing:
        """Qwen2-MoE and Qwen3-MoE (`Qwen{2,3}MoeTopKRouter`)."""
        return Routing(num_experts, top_k, renormalize=norm_topk_prob, weights_in_logits_dtype=True)

    @staticmethod
    def mixtral(num_experts: int, top_k: int) -> Routing:
        """Mixtral (`MixtralTopKRouter`): always renormalized, float32 weights."""
        return Routing(num_experts, top_k, renormalize=True, weights_in_logits_dtype=False)

    @property
    def kernel_routing(self) -> TopKRouting:
        """This routing as the fused MoE ops take it (ops fused_moe_routed)."""
        return TopKRouting(self.top_k, self.renormalize, self.weights_in_logits_dtype)

    def select(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [T, num_experts] -> (topk_weights [T, top_k], topk_ids [T, top_k] int64)."""
        if router_logits.dim() != 2 or router_logits.shape[1] != self.num_experts:
            raise ValueError(f"router_logits: expected [tokens, {self.num_experts}], got {tuple(router_logits.shape)}")
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_logits_dtype:
            weights = weights.to(router_logits.dtype)
        return weights, ids
