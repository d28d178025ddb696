"""ForwardBatch: one packed step, passed explicitly from the model runner down to every layer.

Packed means no padding: all scheduled tokens of all requests sit in one `[num_tokens]` row, request i
owning `query_start_loc[i]:query_start_loc[i+1]`. There is no global "current batch" anywhere; a layer
that needs the metadata gets it as an argument.
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
    query_start_loc: torch.Tensor  # [B + 1] int32: request i's queries are rows qsl[i]:qsl[i+1]
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids of each request, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset); < 0 = skip
    max_query_len: int
    max_seq_len: int
    # Host copies, so reference kernels and planners need no device-to-host sync.
    query_start_loc_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # Backend-specific precomputed plans (e.g. the Triton decode split count); opaque to layers.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn: AttentionMetadata

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]
