"""ForwardBatch: one packed step, passed explicitly from the model runner down to every layer.

Packed means no padding: all scheduled tokens of all requests sit in one `[num_tokens]` row, request i
owning `query_start_loc[i]:query_start_loc[i+1]`. There is no global "current batch" anywhere; a layer
that needs the metadata gets it as an argument. Each attention backend has its own typed metadata
(carpool/attention/): the paged backends read `AttentionMetadata` (Triton: `TritonAttentionMetadata`,
with its kernel plans), training reads `DenseAttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Cascade attention (a shared prefix read once per decode batch) works on whole tiles of this many keys:
# the runner rounds the shared prefix down to it, the kernels start their own keys after it.
CASCADE_ALIGN = 64


@dataclass
class AttentionMetadata:
    """A step of paged attention: each request's queries attend over its whole cached context."""

    query_start_loc: torch.Tensor  # [B + 1] int32: request i's queries are rows qsl[i]:qsl[i+1]
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids of each request, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset); < 0 = skip
    max_query_len: int
    max_seq_len: int
    # Host copies, so reference kernels and planners need no device-to-host sync.
    query_start_loc_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # Host-side plans a backend computes once per step and shares across layers (ops/triton/utils.step_plan).
    step_plans: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


@dataclass
class TritonAttentionMetadata(AttentionMetadata):
    """What the Triton kernels read beyond the paged metadata (all optional: without them the kernels
    plan from the host lists, once per step). A captured CUDA graph fixes num_splits and refills the
    device tensors at each replay (see ops/triton/attention.py)."""

    num_splits: int | None = None  # decode split count; it shapes the grid
    decode_order: torch.Tensor | None = None  # [>= B] int32: decode work balance (balanced_decode_plan)
    decode_split_len: torch.Tensor | None = None  # [1] int32: keys per decode split
    cascade_prefix_len: torch.Tensor | None = None  # [1] int32: keys shared by every request; None: off
    # (part_out [>=B, Hq, >=S, D], part_lse [>=B, Hq, >=S]) float32 buffers for the split partials
    decode_scratch: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class DenseAttentionMetadata:
    """Training (or any cache-free forward): batch_size sequences of seq_len tokens each, packed row after
    row, attending causally within their own sequence; nothing is stored."""

    batch_size: int
    seq_len: int


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: AttentionMetadata | DenseAttentionMetadata

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
