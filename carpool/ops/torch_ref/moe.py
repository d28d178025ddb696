"""The mixture-of-experts MLP in plain PyTorch: the CPU path, and the oracle of ops/triton/moe.py.

`fused_moe` loops over the experts that some token chose, in increasing expert order, and computes for
each the gated MLP of its tokens, the way transformers' `*Experts.forward` (eager) does: the same
operations in the same order, so float32 output matches it bit for bit. `moe_align_block_size` is the
torch twin of the Triton kernels that sort the (token, k) pairs by expert for the grouped GEMM.

Expert parallelism: the weights may hold a contiguous range of the model's experts, global ids
[expert_start, expert_start + E) of num_global_experts, while topk_ids keep the global ids the router
chose. A pair routed to an expert outside the range contributes nothing here (another rank holds that
expert and adds its contribution in the all-reduce): the result is this rank's partial sum, as if the
other experts' routing weights were zero, and those pairs are never computed.

FP8 experts (`ExpertScales`): w13 / w2 hold e4m3 values and the scales say what they stand for. The loop
dequantizes each chosen expert's weights to the activation dtype before its two products (only the
experts some token chose, one at a time: no dequantized copy of the layer is ever held), so in float32
the result is the model whose experts are the dequantized weights, bit for bit. INT4 experts
(`Int4ExpertScales`: w13 / w2 hold carpool's packed int4 layout) are dequantized the same way, one
chosen expert at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from carpool.ops.torch_ref.quant import dequantize_int4
from carpool.quantization.formats import PACK, dequantize_fp8
from carpool.utils import cdiv

FP8_BLOCK = 128  # rows and columns of a block-scaled FP8 weight's scale block


@dataclass(frozen=True)
class ExpertScales:
    """Scales of FP8 (e4m3) stacked expert weights, float32; W = value * scale.

    Per output channel (block=False): w13 [E, 2I] (row r of w13's [2I, H]), w2 [E, H].
    Per 128x128 block (block=True): w13 [E, 2 * ceil(I/128), ceil(H/128)], the gate projection's blocks
    then the up projection's (each projection is blocked on its own, as its checkpoint tensor is, so a
    partial last block of gate rows never shares a scale with up rows); w2 [E, ceil(H/128), ceil(I/128)]."""
    w13: torch.Tensor
    w2: torch.Tensor
    block: bool

    pack = 1  # weight values per stored element

    def check(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        e, two_i, h = w13.shape
        i = two_i // 2
        if self.block:
            want13, want2 = (e, 2 * cdiv(i, FP8_BLOCK), cdiv(h, FP8_BLOCK)), (e, cdiv(h, FP8_BLOCK), cdiv(i, FP8_BLOCK))
        else:
            want13, want2 = (e, two_i), (e, h)
        if tuple(self.w13.shape) != want13 or tuple(self.w2.shape) != want2:
            raise ValueError(f"fused_moe: {'block' if self.block else 'channel'} scales must be w13 {list(want13)} and "
                             f"w2 {list(want2)}; got {list(self.w13.shape)} and {list(self.w2.shape)}")

    def dequantize(self, w13: torch.Tensor, w2: torch.Tensor, expert: int, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `expert`'s (w13 [2I, H], w2 [H, I]) as float32 values * scales, rounded to dtype."""
        i = w13.shape[1] // 2
        if not self.block:
            return ((w13[expert].float() * self.w13[expert, :, None]).to(dtype),
                    (w2[expert].float() * self.w2[expert, :, None]).to(dtype))
        blocks = (FP8_BLOCK, FP8_BLOCK)
        half = self.w13.shape[1] // 2
        gate = dequantize_fp8(w13[expert, :i], self.w13[expert, :half], blocks)
        up = dequantize_fp8(w13[expert, i:], self.w13[expert, half:], blocks)
        return torch.cat([gate, up]).to(dtype), dequantize_fp8(w2[expert], self.w2[expert], blocks).to(dtype)


@dataclass(frozen=True)
class Int4ExpertScales:
    """Scales (and zero points) of 4-bit stacked expert weights in carpool's int4 layout
    (quantization/formats.py): w13 packed [E, 2I, H/8] int32 and w2 packed [E, H, I/8], eight 4-bit values
    per word along the input dim. W = (q - zero) * scale per group of input columns: scales w13 [E, 2I,
    H/G13] and w2 [E, H, I/G2] in the model dtype, zeros of the same shapes (None: symmetric, zero 8).
    The group sizes follow from the shapes: G = input columns / scale columns (the checkpoint's group,
    or one group per row when it quantizes per channel)."""
    w13: torch.Tensor
    w2: torch.Tensor
    w13_zeros: torch.Tensor | None = None
    w2_zeros: torch.Tensor | None = None

    pack = PACK  # weight values per stored int32

    def group_sizes(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int]:
        """(G13, G2): input columns per scale of w13 and of w2."""
        return w13.shape[2] * PACK // self.w13.shape[2], w2.shape[2] * PACK // self.w2.shape[2]

    def check(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        if w13.dtype != torch.int32 or w2.dtype != torch.int32:
            raise ValueError(f"fused_moe: int4 experts must be packed int32, got {w13.dtype} and {w2.dtype}")
        for name, w, s, z in (("w13", w13, self.w13, self.w13_zeros), ("w2", w2, self.w2, self.w2_zeros)):
            e, n, k = w.shape[0], w.shape[1], w.shape[2] * PACK
            groups = s.shape[2] if s.dim() == 3 else 0
            if s.dim() != 3 or tuple(s.shape[:2]) != (e, n) or not groups or k % groups or (k // groups) % PACK:
                raise ValueError(f"fused_moe: int4 {name} scales must be [{e}, {n}, K/G] with a group G of whole "
                                 f"8-column words dividing K={k}; got {list(s.shape)}")
            if z is not None and z.shape != s.shape:
                raise ValueError(f"fused_moe: int4 {name} zeros must have the scales' shape {list(s.shape)}, got "
                                 f"{list(z.shape)}")

    def dequantize(self, w13: torch.Tensor, w2: torch.Tensor, expert: int, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `expert`'s (w13 [2I, H], w2 [H, I]) as (q - zero) * scale in float32, rounded to dtype."""
        g13, g2 = self.group_sizes(w13, w2)
        z13 = None if self.w13_zeros is None else self.w13_zeros[expert]
        z2 = None if self.w2_zeros is None else self.w2_zeros[expert]
        return (dequantize_int4(w13[expert], self.w13[expert], z13, g13, dtype),
                dequantize_int4(w2[expert], self.w2[expert], z2, g2, dtype))


QuantizedExperts = ExpertScales | Int4ExpertScales


def check_moe_inputs(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, expert_start: int = 0, num_global_experts: int | None = None,
                     pack: int = 1) -> None:
    """Shapes every implementation relies on: hidden [T, H], w13 [E, 2I, H / pack] (gate rows, then up
    rows), w2 [E, H, I / pack] (pack: weight values per stored element, 8 for packed int4),
    topk_weights and topk_ids [T, k]; the E experts held are global experts [expert_start,
    expert_start + E) of num_global_experts (default E)."""
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe: expected hidden [T, H], w13 [E, 2I, H], w2 [E, H, I]; got "
                         f"{tuple(hidden.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    e, two_i, h = w13.shape[0], w13.shape[1], w13.shape[2] * pack
    if h != hidden.shape[1] or two_i % 2 or w2.shape != (e, h, two_i // 2 // pack) or (two_i // 2) % pack:
        per = "" if pack == 1 else f" / {pack}"
        raise ValueError(f"fused_moe: w13 must be [E, 2I, H={hidden.shape[1]}{per}] and w2 [E, H, I{per}]; got "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0] or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"fused_moe: topk_ids and topk_weights must both be [T={hidden.shape[0]}, k]; got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    total = e if num_global_experts is None else num_global_experts
    if expert_start < 0 or expert_start + e > total:
        raise ValueError(f"fused_moe: the {e} experts held from expert_start={expert_start} must lie within "
                         f"num_global_experts={total}")


def local_expert_ids(topk_ids: torch.Tensor, num_experts: int, expert_start: int) -> torch.Tensor:
    """topk_ids as indices into the E = num_experts experts held from expert_start; a pair routed to an
    expert held elsewhere gets E (one past the last held expert)."""
    local = topk_ids.to(torch.int64) - expert_start
    return torch.where((local >= 0) & (local < num_experts), local, num_experts)


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, expert_start: int = 0, num_global_experts: int | None = None,
              scales: QuantizedExperts | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with e = topk_ids[t, k] -> [T, H],
    the sum taken over the pairs whose expert the weights hold (see the module docstring).

    With tensor parallelism w13/w2 hold this rank's slice of every expert's intermediate dimension, or
    (expert parallelism) whole experts from expert_start; either way the result is this rank's partial
    sum. With `scales`, w13 / w2 are FP8 or packed int4 and each chosen expert is dequantized to
    hidden's dtype first. Host-syncing (it asks which experts were hit): CPU path only."""
    check_moe_inputs(hidden, w13, w2, topk_weights, topk_ids, expert_start, num_global_experts,
                     scales.pack if scales is not None else 1)
    if scales is not None:
        scales.check(w13, w2)
    num_experts = w13.shape[0]
    out = torch.zeros_like(hidden)
    # expert_mask[e, k, t]: token t chose held expert e in its k-th slot (row E: an expert held elsewhere).
    local_ids = local_expert_ids(topk_ids, num_experts, expert_start)
    expert_mask = F.one_hot(local_ids, num_classes=num_experts + 1).permute(2, 1, 0)[:num_experts]
    for expert in torch.nonzero(expert_mask.sum(dim=(1, 2)) > 0).flatten().tolist():
        slot, token = torch.where(expert_mask[expert])
        if scales is None:
            w_in, w_out = w13[expert], w2[expert]
        else:
            w_in, w_out = scales.dequantize(w13, w2, expert, hidden.dtype)
        gate, up = F.linear(hidden[token], w_in).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_out) * topk_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


@dataclass(frozen=True)
class TopKRouting:
    """What the fused routing computes from router logits [T, num_experts] (layers/moe/routing.py says
    how each family sets it): the top_k experts of a float32 softmax over all experts, their
    probabilities divided by their sum when `renormalize`, rounded to the logits' dtype when
    `weights_in_logits_dtype`."""
    top_k: int
    renormalize: bool
    weights_in_logits_dtype: bool


def select_experts(router_logits: torch.Tensor, routing: TopKRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k], topk_ids [T, k] int64) as `Routing.select` computes them, with one tie rule:
    the oracle of the Triton routing (ops/triton/moe.py), which orders experts by decreasing logit and
    equal logits by increasing id. (torch.topk leaves the order of equal values unspecified; softmax is
    increasing, so ranking logits ranks the probabilities, up to two distinct logits whose float32
    probabilities round equal.) The weights are the float32 softmax probabilities of the chosen experts."""
    if router_logits.dim() != 2 or not 1 <= routing.top_k <= router_logits.shape[1]:
        raise ValueError(f"router_logits: expected [tokens, num_experts >= top_k={routing.top_k}], got "
                         f"{tuple(router_logits.shape)}")
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    ids = torch.sort(router_logits.float(), dim=-1, descending=True, stable=True).indices[:, :routing.top_k]
    weights = probs.gather(1, ids)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routing.weights_in_logits_dtype:
        weights = weights.to(router_logits.dtype)
    return weights, ids


def fused_moe_routed(hidden: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     routing: TopKRouting, *, expert_start: int = 0, num_global_experts: int | None = None,
                     scales: QuantizedExperts | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The oracle of the Triton op of the same name: `select_experts`, then `fused_moe`. Returns (output
    [T, H], topk_weights, topk_ids)."""
    weights, ids = select_experts(router_logits, routing)
    out = fused_moe(hidden, w13, w2, weights, ids, expert_start=expert_start,
                    num_global_experts=num_global_experts, scales=scales)
    return out, weights, ids


def max_padded_pairs(num_pairs: int, num_experts: int, block_size: int) -> int:
    """An upper bound on the sorted-and-padded length for any routing of num_pairs (token, k) pairs,
    a multiple of block_size: each expert's segment is padded up to a multiple of block_size, adding at
    most block_size - 1 (and an expert with no pair adds nothing)."""
    padded = num_pairs + min(num_experts, num_pairs) * (block_size - 1)
    return -(-padded // block_size) * block_size


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_start: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the (token, k) pairs by expert and pad each expert's segment to a multiple of block_size.

    The experts are the num_experts held from global id expert_start; pairs routed to other experts are
    left out (no segment, no slot), and expert_ids are indices into the held experts.

    Returns (sorted_pair_ids [max_padded] int32, expert_ids [max_padded / block_size] int32,
    num_padded [1] int32), max_padded = max_padded_pairs(T*k, E, block_size). A pair is named by its
    flat index t * k + slot into topk_ids; within an expert the pairs are in increasing index order;
    padding slots hold T*k. Block b (rows b*block_size ...) belongs to expert_ids[b] for every block
    below num_padded / block_size; entries of either output past num_padded are unspecified (the
    grouped GEMM never reads them). Sizes depend only on
    the shapes, so the Triton twin can run inside a CUDA graph."""
    flat = local_expert_ids(topk_ids.flatten(), num_experts, expert_start)
    num_pairs = flat.numel()
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    held = torch.nonzero(flat < num_experts).flatten()  # the pairs this rank computes, in index order
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat[held], torch.ones_like(held))
    padded = (counts + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = held[torch.sort(flat[held], stable=True).indices]
    experts_sorted = flat[order]
    rank = torch.arange(held.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[experts_sorted]
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[starts[experts_sorted] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_size, device=flat.device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), ends[-1:].to(torch.int32)
