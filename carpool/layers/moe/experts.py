"""The routed experts of one mixture-of-experts layer, stacked so one fused op computes them all.

Checkpoints store each expert's projections as separate tensors (`experts.{e}.gate_proj.weight`, ...);
the layer holds them as two stacks, w13 [E, 2I, H] (expert e's gate rows, then its up rows) and
w2 [E, H, I], the layout of `ops.*.fused_moe`. Each parameter's loader copies one checkpoint tensor into
its expert's rows, so the stacks fill tensor by tensor and no second full copy is ever held.

As a linear layer has a LinearMethod, the experts have an `ExpertsMethod`: the layer decides which
experts and which slice of each this rank holds (`locate`), the method decides how they are stored and
computed (model-dtype stacks here; FP8 stacks with their scales in quantization/moe_methods.py).

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

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from carpool.distributed import SINGLE_RANK, Communicator
from carpool.layers.linear import load_narrow, loaded_shape
from carpool.layers.linear_method import set_weight_loader
from carpool.ops.torch_ref.moe import QuantizedExperts, TopKRouting
from carpool.quantization.methods import alias_note
from carpool.quantization.sharding import ShardSlice

EXPERT_KINDS = ("w1", "w2", "w3")  # gate, down, up (Mixtral's names)


@dataclass(frozen=True)
class ExpertTensor:
    """Where one checkpoint expert tensor goes on this rank: held expert `local` (an index into the
    stacks), its projection `kind`, and the logical rows and columns of the checkpoint matrix ([I, H]
    for w1 / w3, [H, I] for w2) this rank holds. For w1 / w3, `sl.dst_row` is the first of the tensor's
    rows in w13's [2I_rank] (0: gate, I_rank: up)."""
    local: int
    kind: str
    sl: ShardSlice


class ExpertsMethod(ABC):
    """How a FusedExperts layer stores its weights and computes with them."""

    @abstractmethod
    def create_weights(self, layer: "FusedExperts", dtype: torch.dtype) -> None:
        """Register the parameters of layer.experts_per_rank experts of layer.intermediate_per_rank rows,
        each with a loader taking (param, checkpoint tensor, (kind, global expert id))."""

    @abstractmethod
    def stacks(self, layer: "FusedExperts") -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts | None]:
        """(w13, w2, their scales or None) as the fused MoE ops take them."""

    def apply(self, layer: "FusedExperts", x: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial sums [T, H] of the routed experts."""
        w13, w2, scales = self.stacks(layer)
        return layer.fused_moe(x, w13, w2, topk_weights, topk_ids, expert_start=layer.expert_start,
                               num_global_experts=layer.num_experts, scales=scales)

    def apply_routed(self, layer: "FusedExperts", x: torch.Tensor, router_logits: torch.Tensor,
                     routing: TopKRouting) -> torch.Tensor:
        """This rank's partial sums [T, H] from the router logits [T, num_experts], the routing computed
        by the kernels (layer.fused_moe_routed must be set)."""
        assert layer.fused_moe_routed is not None
        w13, w2, scales = self.stacks(layer)
        out, _, _ = layer.fused_moe_routed(x, router_logits, w13, w2, routing, expert_start=layer.expert_start,
                                           num_global_experts=layer.num_experts, scales=scales)
        return out

    def process_weights_after_loading(self, layer: "FusedExperts") -> None:
        """Check (and repack) what was loaded."""

    @staticmethod
    def mark_loaded(layer: "FusedExperts", name: str, where: ExpertTensor) -> None:
        """Record that tensor `name` of held expert where.local's projection where.kind arrived."""
        layer.__dict__.setdefault("loaded_expert_tensors", set()).add((name, where.kind, where.local))

    @staticmethod
    def check_loaded(layer: "FusedExperts", names: list[str], aliases: Mapping[str, str] | None = None) -> None:
        """Every held expert's every projection arrived with each of `names`. (The loader's own missing
        check sees a stack as loaded once any expert's tensor is: a checkpoint lacking one expert's
        projection would otherwise leave those rows uninitialized.) The error also names a tensor's
        `aliases` (alias -> name), the other spellings a checkpoint may use."""
        loaded = layer.__dict__.get("loaded_expert_tensors", set())
        for name in names:
            for local in range(layer.experts_per_rank):
                for kind in EXPERT_KINDS:
                    if (name, kind, local) not in loaded:
                        raise ValueError(f"the checkpoint lacks expert {layer.expert_start + local}'s {kind} "
                                         f"{name}{alias_note(aliases or {}, name)}")


class UnquantizedExpertsMethod(ExpertsMethod):
    """w13_weight and w2_weight in the model dtype."""

    def create_weights(self, layer: "FusedExperts", dtype: torch.dtype) -> None:
        inter, local, h = layer.intermediate_per_rank, layer.experts_per_rank, layer.hidden_size
        layer.w13_weight = set_weight_loader(
            nn.Parameter(torch.empty(local, 2 * inter, h, dtype=dtype), requires_grad=False), layer.weight_loader)
        layer.w2_weight = set_weight_loader(
            nn.Parameter(torch.empty(local, h, inter, dtype=dtype), requires_grad=False), layer.weight_loader)

    def stacks(self, layer: "FusedExperts") -> tuple[torch.Tensor, torch.Tensor, QuantizedExperts | None]:
        return layer.w13_weight, layer.w2_weight, None

    def process_weights_after_loading(self, layer: "FusedExperts") -> None:
        self.check_loaded(layer, ["weight"])


class FusedExperts(nn.Module):
    """w13 [E_rank, 2 I_rank, H] and w2 [E_rank, H, I_rank] (in the method's format); forward(x,
    topk_weights, topk_ids) -> this rank's partial sums [T, H]. Without expert parallelism E_rank = E and
    I_rank = I / tp; with it E_rank = E / tp (global experts expert_start ... expert_start + E_rank - 1)
    and I_rank = I.

    Checkpoint shard ids: ("w1", e) expert e's gate projection [I, H], ("w3", e) its up projection
    [I, H], ("w2", e) its down projection [H, I] (Mixtral's names; Qwen's gate/up/down_proj map to them);
    e is the global expert id, and a tensor of an expert held by another rank is not read.

    fused_moe_routed (the Triton backend's, when KernelConfig.fused_moe_routing): `forward_routed` takes
    the router logits and the kernels route; None: the caller routes and calls forward."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 fused_moe: Callable[..., torch.Tensor], comm: Communicator = SINGLE_RANK,
                 expert_parallel: bool = False, method: ExpertsMethod | None = None,
                 fused_moe_routed: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
                 ) -> None:
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
        self.fused_moe = fused_moe
        self.fused_moe_routed = fused_moe_routed
        self.method = method or UnquantizedExpertsMethod()
        self.method.create_weights(self, dtype)

    def holds(self, expert: int) -> bool:
        """Whether this rank holds (a slice of) global expert `expert`."""
        return self.expert_start <= expert < self.expert_start + self.experts_per_rank

    def locate(self, shard_id: Any) -> ExpertTensor | None:
        """Where the checkpoint tensor with this shard id goes on this rank; None for an expert held by
        another rank (its tensor is then never read). Raises for an unknown kind or expert id."""
        kind, expert = shard_id
        if kind not in EXPERT_KINDS:
            raise ValueError(f"unknown expert shard {shard_id!r}")
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert}, but the model has num_experts={self.num_experts}")
        if not self.holds(expert):
            return None
        h, i = self.hidden_size, self.intermediate_size
        inter, start = self.intermediate_per_rank, self.intermediate_start
        if kind == "w2":
            sl = ShardSlice(0, 0, h, start, inter, h, i)
        else:  # gate rows first, then up rows: the order fused_moe reads
            sl = ShardSlice(0 if kind == "w1" else inter, start, inter, 0, h, i, h)
        return ExpertTensor(expert - self.expert_start, kind, sl)

    def expected_shape(self, kind: str) -> list[int]:
        """The whole checkpoint matrix of one expert projection."""
        h, i = self.hidden_size, self.intermediate_size
        return [h, i] if kind == "w2" else [i, h]

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any) -> None:
        """A model-dtype expert weight into its stack."""
        kind, expert = shard_id
        expected = self.expected_shape(kind) if kind in EXPERT_KINDS else None
        if expected is not None and loaded_shape(loaded) != expected:
            raise ValueError(f"checkpoint tensor of expert {expert} ({kind}) has shape {loaded_shape(loaded)}, "
                             f"expected {expected}")
        where = self.locate(shard_id)
        if where is None:
            return  # another rank's expert: its tensor is never read here
        sl, local = where.sl, param.data[where.local]
        if kind == "w2":
            local.copy_(load_narrow(loaded, 1, sl.src_col, sl.cols))
        else:
            local.narrow(0, sl.dst_row, sl.rows).copy_(load_narrow(loaded, 0, sl.src_row, sl.rows))
        self.method.mark_loaded(self, "weight", where)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, topk_weights, topk_ids)

    def forward_routed(self, x: torch.Tensor, router_logits: torch.Tensor, routing: TopKRouting) -> torch.Tensor:
        """forward with the routing computed inside the kernels from the router logits (fused_moe_routed)."""
        return self.method.apply_routed(self, x, router_logits, routing)
