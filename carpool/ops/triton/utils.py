"""Helpers of the Triton ops: output allocation (behind one function so tests can poison it),
per-step host plans shared by all layers, and programmatic dependent launch (PDL).

PDL (Hopper and later): a kernel launched with it may start while the kernel before it in the stream is
still running; it must call `griddepcontrol.wait` before it reads anything that kernel (or any earlier
one) wrote, or writes anything they may still read. Every Triton kernel here does so at its start
(`pdl_enter`), except that the GEMV first loads its first weight tile, which nothing writes (the push
exchange's norm first polls its own slots: all_reduce_norm.py; the decode attention and its merge first
read the step's metadata: `pdl_wait`): at batch 1
the next projection's weights then stream while the small kernels between two projections run, and
the launch latency between kernels is hidden (inside CUDA graphs too). `pdl_enter` also lets the next
kernel launch at once; the GEMV lets it launch only after its own wait (`pdl_wait_then_release`), so
at most the next projection's first wave is resident and waiting.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl

from carpool.forward_batch import AttentionMetadata

T = TypeVar("T")


def empty_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str
                 ) -> torch.Tensor:
    """Uninitialized output; every element must be written by a kernel (tests fill it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def step_plan(meta: AttentionMetadata, name: str, build: Callable[[list[int], list[int]], T]) -> T:
    """build(query_start_loc, seq_lens) on host lists, computed once per step and shared by all layers.

    Cached in meta.step_plans and keyed by the host lists' contents, so a metadata object
    that the runner refills for the next step never serves a stale plan. Without host lists (not
    filled by the runner) they are read from the device, which syncs, and nothing is cached."""
    qsl, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    if not qsl:
        return build(meta.query_start_loc.tolist(), meta.seq_lens.tolist())
    signature = (tuple(qsl), tuple(seq_lens))
    plans = meta.step_plans
    if plans.get("signature") != signature:
        plans.clear()
        plans["signature"] = signature
    if name not in plans:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # (a plan's upload would be captured reading host memory freed after the capture: a graph
            # must find its plans built in warm-up, on the same metadata object)
            raise RuntimeError(f"step plan {name!r} built during CUDA graph capture; warm up the graph's "
                               "metadata first")
        plans[name] = build(qsl, seq_lens)
    return plans[name]


def interpreting() -> bool:
    """Kernels run in the Triton interpreter (TRITON_INTERPRET=1: CPU tests), which lacks the GPU-only
    instructions some kernels use when compiled."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_pdl_enabled = False


def pdl_supported(device: torch.device) -> bool:
    """PDL needs a CUDA device of compute capability 9.0 or newer, compiled kernels (not the
    interpreter) and a Triton that exposes grid dependency control."""
    if device.type != "cuda" or interpreting():
        return False
    try:
        from triton.language.extra import cuda as tl_cuda
    except ImportError:
        return False
    return hasattr(tl_cuda, "gdc_wait") and torch.cuda.get_device_capability(device)[0] >= 9


def choose_pdl(device: torch.device, disabled: bool) -> None:
    """The process's PDL choice (on where supported, unless disabled), made once before any kernel
    launch that should follow it: the model runner's, and a TP worker's all-reduce self-tests."""
    set_pdl(not disabled and pdl_supported(device))


def set_pdl(enabled: bool) -> None:
    """Launch every Triton kernel of this process with PDL (the model runner decides once)."""
    global _pdl_enabled
    _pdl_enabled = enabled


def pdl() -> bool:
    return _pdl_enabled


# Every PDL kernel must reach gdc_wait in every program before it exits (pdl_enter first thing, or the
# GEMV's pdl_wait_then_release and the pushed norm's wait before their stores), and a kernel that pushes
# to the next norm must wait before it releases (pdl_wait_then_release): the push exchange
# (all_reduce_norm.py) relies on a kernel starting its writes only after all earlier kernels have
# finished, transitively.
@triton.jit
def pdl_release(USE_PDL: tl.constexpr):
    """Let the next kernel launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """Wait for the previous kernels' writes. Before it, a kernel may read only what was complete when
    its predecessor started: the decode kernel reads what came before its q/k/v projection (a GEMV
    releases after its own wait; a cuBLAS GEMM starts only after the kernel before it ends)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """At a kernel's start: let the next kernel launch, then wait for the previous kernels' writes."""
    pdl_release(USE_PDL)
    pdl_wait(USE_PDL)


@triton.jit
def pdl_wait_then_release(USE_PDL: tl.constexpr):
    """Wait for the previous kernels' writes, then let the next kernel launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
