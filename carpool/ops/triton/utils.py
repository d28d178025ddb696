"""Helpers of the Triton ops: output allocation (behind one function so tests can poison it) and
per-step host plans shared by all layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from carpool.forward_batch import AttentionMetadata

T = TypeVar("T")


def empty_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str
                 ) -> torch.Tensor:
    """Uninitialized output; every element must be written by a kernel (tests fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def step_plan(meta: AttentionMetadata, name: str, build: Callable[[list[int], list[int]], T]) -> T:
    """build(query_start_loc, seq_lens) on host lists, computed once per step and shared by all layers.

    Cached in meta.extra["triton_plans"] and keyed by the host lists' contents, so a metadata object
    that the runner refills for the next step never serves a stale plan. Without host lists (not
    filled by the runner) they are read from the device, which syncs, and nothing is cached."""
    qsl, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    if not qsl:
        return build(meta.query_start_loc.tolist(), meta.seq_lens.tolist())
    signature = (tuple(qsl), tuple(seq_lens))
    plans = meta.extra.get("triton_plans")
    if plans is None or plans["signature"] != signature:
        plans = {"signature": signature}
        meta.extra["triton_plans"] = plans
    if name not in plans:
        plans[name] = build(qsl, seq_lens)
    return plans[name]
