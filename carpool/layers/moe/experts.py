"""The routed experts of one mixture-of-experts layer, stacked so one fused op computes them all.

Checkpoints store each expert's projections as separate tensors (`experts.{e}.gate_proj.weight`, ...);
the layer holds them as two stacks, w13 [E, 2I, H] (expert e's gate rows, then its up rows) and
w2 [E, H, I], the layout of `ops.*.fused_moe`. The `weight_loader` copies one checkpoint tensor into
its expert's rows, so the stacks fill tensor by tensor and no second full copy is ever held.

Tensor parallelism splits the experts across ranks in one of two ways; either way each rank's result is
its partial sum of the full one, reduced by the decoder layer like any MLP's:
- along the intermediate dimension (the default): each rank holds the same slice of every expert, like a
  dense MLP's column/row split; silu(gate) * up is elementwise over that dimension and the routing weight
  scales the down projection's output, so the slices' results add up;
- expert parallelism (`enable_expert_parallel`): rank r holds whole experts r E/N ... (r + 1) E/N - 1.
  Every rank computes the same routing (the router is replicated), and computes only the (token, expert)
  pairs of its own experts: the others' contributions are zero on this rank and arrive in the reduction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from carpool.distributed import SINGLE_RANK, Communicator
from carpool.layers.linear import load_narrow, loaded_shape
from carpool.layers.linear_method import set_weight_loader


class FusedExperts(nn.Module):
    """w13_weight [E_rank, 2 I_rank, H] and w2_weight [E_rank, H, I_rank]; forward(x, topk_weights,
    topk_ids) -> this rank's partial sums [T, H]. Without expert parallelism E_rank = E and
    I_rank = I / tp; with it E_rank = E / tp (global experts expert_start ... expert_start + E_rank - 1)
    and I_rank = I.

    Checkpoint shard ids: ("w1", e) expert e's gate projection [I, H], ("w3", e) its up projection
    [I, H], ("w2", e) its down projection [H, I] (Mixtral's names; Qwen's gate/up/down_proj map to them);
    e is the global expert id, and a tensor of an expert held by another rank is not read."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 fused_moe: Callable[..., torch.Tensor], comm: Communicator = SINGLE_RANK,
                 expert_parallel: bool = False) -> None:
        super().__init__()
        if expert_parallel:
            if num_experts % comm.size:
                raise ValueError(f"enable_expert_parallel: the model's num_experts={num_experts} does not divide "
                                 f"by tensor_parallel_size={comm.size}")
            self.experts_per_rank = num_experts // comm.size
            self.expert_start = comm.rank * self.experts_per_rank
            self.intermediate_per_rank = intermediate_size
            self.intermediate_start = 0
        else:
            if intermediate_size % comm.size:
                raise ValueError(f"moe_intermediate_size {intermediate_size} does not divide by "
                                 f"tensor_parallel_size={comm.size}")
            self.experts_per_rank = num_experts
            self.expert_start = 0
            self.intermediate_per_rank = intermediate_size // comm.size
            self.intermediate_start = comm.rank * self.intermediate_per_rank
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.expert_parallel = expert_parallel
        inter, local = self.intermediate_per_rank, self.experts_per_rank
        self.w13_weight = set_weight_loader(
            nn.Parameter(torch.empty(local, 2 * inter, hidden_size, dtype=dtype), requires_grad=False),
            self.weight_loader)
        self.w2_weight = set_weight_loader(
            nn.Parameter(torch.empty(local, hidden_size, inter, dtype=dtype), requires_grad=False),
            self.weight_loader)
        self.fused_moe = fused_moe

    def holds(self, expert: int) -> bool:
        """Whether this rank holds (a slice of) global expert `expert`."""
        return self.expert_start <= expert < self.expert_start + self.experts_per_rank

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
        kind, expert = shard_id
        if kind not in ("w1", "w2", "w3"):
            raise ValueError(f"unknown expert shard {shard_id!r}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert}, but the model has num_experts={self.num_experts}")
        h, i = self.hidden_size, self.intermediate_size
        expected = [h, i] if kind == "w2" else [i, h]
        if loaded_shape(loaded) != expected:
            raise ValueError(f"checkpoint tensor of expert {expert} ({kind}) has shape {loaded_shape(loaded)}, "
                             f"expected {expected}")
        if not self.holds(expert):
            return  # another rank's expert: its tensor is never read here
        inter, start = self.intermediate_per_rank, self.intermediate_start
        local = param.data[expert - self.expert_start]
        if kind == "w2":
            local.copy_(load_narrow(loaded, 1, start, inter))
        else:  # gate rows first, then up rows: the order fused_moe reads
            offset = 0 if kind == "w1" else inter
            local.narrow(0, offset, inter).copy_(load_narrow(loaded, 0, start, inter))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                              expert_start=self.expert_start, num_global_experts=self.num_experts)
