"""The mixture-of-experts MLP in plain PyTorch: the CPU path, and the oracle of ops/triton/moe.py.

`fused_moe` loops over the experts that some token chose, in increasing expert order, and computes for
each the gated MLP of its tokens, the way transformers' `*Experts.forward` (eager) does: the same
operations in the same order, so float32 output matches it bit for bit. `moe_align_block_size` is the
torch twin of the Triton kernels that sort the (token, k) pairs by expert for the grouped GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_moe_inputs(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> None:
    """Shapes every implementation relies on: hidden [T, H], w13 [E, 2I, H] (gate rows, then up rows),
    w2 [E, H, I], topk_weights and topk_ids [T, k]."""
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe: expected hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]; got "
                         f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    e, two_i, h = w13.shape
    if h != hidden.shape[1] or two_i % 2 or w2.shape != (e, h, two_i // 2):
        raise ValueError(f"fused_moe: w13 must be [E, 2I, H={hidden.shape[1]}] and w2 [E, H, I]; got "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_ids and topk_weights must both be [T={hidden.shape[0]}, k]; got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, k] -> [T, H].

    With tensor parallelism w13/w2 hold this rank's slice of every expert's intermediate dimension and
    the result is this rank's partial sum. Host-syncing (it asks which experts were hit): CPU path only."""
    check_moe_inputs(hidden, w13, w2, topk_weights, topk_ids)
    num_experts = w13.shape[0]
    out = torch.zeros_like(hidden)
    # expert_mask[e, k, t]: token t chose expert e in its k-th slot.
    expert_mask = F.one_hot(topk_ids, num_classes=num_experts).permute(2, 1, 0)
    for expert in torch.nonzero(expert_mask.sum(dim=(1, 2)) > 0).flatten().tolist():
        slot, token = torch.where(expert_mask[expert])
        gate, up = F.linear(hidden[token], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def max_padded_pairs(num_pairs: int, num_experts: int, block_size: int) -> int:
    """An upper bound on the sorted-and-padded length for any routing of num_pairs (token, k) pairs,
    a multiple of block_size: each expert's segment is padded up to a multiple of block_size, adding at
    most block_size - 1 (and an expert with no pair adds nothing)."""
    padded = num_pairs + min(num_experts, num_pairs) * (block_size - 1)
    return -(-padded // block_size) * block_size


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, k) pairs by expert and pad each expert's segment to a multiple of block_size.

    Returns (sorted_pair_ids [max_padded] int32, expert_ids [max_padded / block_size] int32,
    num_padded [1] int32), max_padded = max_padded_pairs(T*k, E, block_size). A pair is named by its
    flat index t * k + slot into topk_ids; within an expert the pairs are in increasing index order;
    padding slots hold T*k. Block b (rows b*block_size ...) belongs to expert_ids[b] for every block
    below num_padded / block_size; entries of either output past num_padded are unspecified (the
    grouped GEMM never reads them). Sizes depend only on
    the shapes, so the Triton twin can run inside a CUDA graph."""
    flat = topk_ids.flatten().to(torch.int64)
    num_pairs = flat.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.sort(flat, stable=True).indices
    experts_sorted = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[experts_sorted]
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[starts[experts_sorted] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_size, device=flat.device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), ends[-1:].to(torch.int32)
