"""One-shot all-reduce over PyTorch symmetric memory, for the small messages of decode steps.

Why: a decode step of a tensor-parallel model all-reduces twice per layer (after attention and after
the MLP), a few KB per token. NCCL costs some 10-20 us per call for such messages even inside a CUDA
graph, which at 64 calls a step is a large share of a 2-3 ms step. Symmetric memory maps each rank's
buffer into every peer's address space (CUDA IPC over NVLink); `one_shot_all_reduce_copy` then does the
whole all-reduce in one kernel: copy the local partial sums into this rank's buffer, meet the peers at a
barrier on the signal pads, load every peer's buffer and add. The kernel reads device state only, so
CUDA graphs capture it like any other kernel. The all-reduce that feeds a residual add + RMSNorm (two
per layer) goes instead through one fused kernel with a buffer of its own (`NormExchange`,
ops/triton/all_reduce_norm.py), which meets the peers once instead of twice and saves the norm kernel.

Safety on the shared GPU hosts: NVLink multicast stays off. `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` (and
`NCCL_NVLS_ENABLE=0`, `NVSHMEM_DISABLE_NVLS=1`) are set in the process environment before the first
symmetric allocation (see `MULTICAST_OFF`), the CUDA backend is requested rather than NVSHMEM, and
only the plain-load one-shot op is ever called, never a `multimem_*` op.

Every rank must take the same path for every call, or the ranks wait at different collectives
forever. So whether the fast path exists is agreed once at start-up (distributed/startup.py: every
rank's checks, self-tests against NCCL, then a MIN over a CPU group), and which path a tensor takes
depends only on its dtype, size and storage offset, which are the same on every rank by construction.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from carpool.distributed.push_exchange import PushExchange

# Messages up to this size take the one-shot path (decode of up to 256 tokens of a 5120-wide model is
# 2.6 MB in bf16); larger ones (prefill chunks) go to NCCL, whose bandwidth is better there.
DEFAULT_MAX_BYTES = 4 << 20
ALIGN = 16  # the one-shot kernel's widest vector access; the copy variant needs equal alignment

# Environment that keeps NVLink multicast off in NCCL, symmetric memory and NVSHMEM. Mandatory on the
# shared hosts: set in every worker's environment and again in os.environ before torch.distributed starts.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast() -> None:
    os.environ.update(MULTICAST_OFF)


def ops_available() -> bool:
    ops = getattr(torch.ops, "symm_mem", None)
    try:
        return ops is not None and hasattr(ops, "one_shot_all_reduce_copy")
    except (AttributeError, RuntimeError):
        return False


def local_reasons(device: torch.device, dtype: torch.dtype, local_rank: int, local_world_size: int,
                  world_size: int) -> list[str]:
    """Why this rank cannot use the fast path (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append("not a CUDA device")
        return reasons
    if local_world_size != world_size:
        reasons.append("ranks span several nodes (symmetric memory here is one node's)")
    if dtype not in (torch.bfloat16, torch.float32):
        reasons.append(f"dtype {dtype} (the one-shot kernel takes bfloat16 and float32)")
    if not ops_available():
        reasons.append("torch.ops.symm_mem.one_shot_all_reduce_copy missing in this PyTorch")
    if os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") != "1":
        reasons.append("TORCH_SYMM_MEM_DISABLE_MULTICAST is not 1")
    for peer in range(local_world_size):
        if peer != local_rank and not torch.cuda.can_device_access_peer(local_rank, peer):
            reasons.append(f"no peer access from GPU {local_rank} to GPU {peer}")
    return reasons


def peer_addresses(t: torch.Tensor, group_name: str, world: int) -> tuple[torch.Tensor, int]:
    """Every rank's address of its copy of the symmetric tensor t (int64 [world], on t's device), and
    this rank's index in the group; collective over the group."""
    import torch.distributed._symmetric_memory as symm_mem

    handle = symm_mem.rendezvous(t, group_name)
    assert handle.world_size == world, "symmetric-memory group size mismatch"
    offset = t.data_ptr() - handle.buffer_ptrs[handle.rank]  # the tensor within its allocation
    ptrs = [p + offset for p in handle.buffer_ptrs]
    return torch.tensor(ptrs, dtype=torch.int64, device=t.device), handle.rank


@dataclass
class NormExchange:
    """Device state of the fused all-reduce + residual add + RMSNorm (ops/triton/all_reduce_norm.py):
    a symmetric data buffer of two halves, symmetric signal pads, every rank's addresses of both, and
    this rank's per-program epochs and per-row half bits."""

    data: torch.Tensor  # symmetric, [2 * half_stride] of the model dtype
    pads: torch.Tensor  # symmetric, int32 [MAX_PROGRAMS * world_size], zero at start
    buffer_ptrs: torch.Tensor  # int64 [world_size]: every rank's `data` address
    pad_ptrs: torch.Tensor  # int64 [world_size]: every rank's `pads` address
    epochs: torch.Tensor  # int32 [MAX_PROGRAMS]
    uses: torch.Tensor  # int32 [max rows]: which half each row slot takes next
    half_stride: int
    rank: int
    world_size: int
    max_programs: int  # at most the SM count: every program of a call resident at once
    width: int = 0  # the row width the exchange is held to (0: not yet used)

    @classmethod
    def create(cls, device: torch.device, dtype: torch.dtype, group_name: str, world: int,
               max_bytes: int) -> "NormExchange":
        import torch.distributed._symmetric_memory as symm_mem

        from carpool.ops.triton.all_reduce_norm import MAX_PROGRAMS

        half = max_bytes // torch.tensor([], dtype=dtype).element_size()
        data = symm_mem.empty(2 * half, dtype=dtype, device=device)
        pads = symm_mem.empty(MAX_PROGRAMS * world, dtype=torch.int32, device=device)
        pads.zero_()
        torch.cuda.synchronize(device)  # zero before any peer can signal (the caller agrees next)

        buffer_ptrs, rank = peer_addresses(data, group_name, world)
        pad_ptrs, _ = peer_addresses(pads, group_name, world)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return cls(data, pads, buffer_ptrs, pad_ptrs, torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device),
                   torch.zeros(max(1, half // 64), dtype=torch.int32, device=device), half, rank, world,
                   min(MAX_PROGRAMS, sms))

    def eligible(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Shape checks only (equal on every rank), like CustomAllReduce.eligible. One row width per
        exchange (the model's hidden size), so that the halves of a row slot alternate between calls."""
        return (x.dim() == 2 and self.width in (0, x.shape[1]) and x.dtype == self.data.dtype
                and x.is_contiguous() and residual.is_contiguous() and residual.shape == x.shape
                and 0 < x.shape[0] <= self.uses.numel()
                and x.numel() <= self.half_stride and x.shape[1] <= 16384)


class CustomAllReduce:
    """The fast path once established; `create` returns None when it is not available on every rank."""

    def __init__(self, buffer: torch.Tensor, group_name: str, max_bytes: int,
                 exchange: "NormExchange | None" = None) -> None:
        self.buffer = buffer  # this rank's symmetric buffer, flat, of the model dtype
        self.group_name = group_name
        self.max_bytes = max_bytes
        self.dtype = buffer.dtype
        self.exchange = exchange  # state of the fused all-reduce + add + RMSNorm (None: not available)
        self.push: "PushExchange | None" = None  # batch-1 push exchange (None: not available)
        self.calls = 0  # eager calls plus captures (graph replays are not counted)

    @classmethod
    def allocate(cls, device: torch.device, dtype: torch.dtype, group: "dist.ProcessGroup", max_bytes: int,
                 fused_norm: bool) -> "CustomAllReduce":
        """The symmetric buffers (and, with fused_norm, the fused norm's exchange); collective. Not usable
        before the start-up self-tests passed on every rank (distributed/startup.py)."""
        import torch.distributed._symmetric_memory as symm_mem

        disable_multicast()
        try:
            symm_mem.set_backend("CUDA")  # plain CUDA IPC mappings, not NVSHMEM
        except Exception:  # noqa: BLE001 - older PyTorch has only this backend; newer refuses a second set
            pass
        group_name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed before PyTorch deprecated it; harmless after
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(group_name)
        buffer = symm_mem.empty(max_bytes // torch.tensor([], dtype=dtype).element_size(), dtype=dtype,
                                device=device)
        symm_mem.rendezvous(buffer, group_name)
        exchange = None
        if fused_norm:
            exchange = NormExchange.create(device, dtype, group_name, dist.get_world_size(group), max_bytes)
        return cls(buffer, group_name, max_bytes, exchange)

    def norm_eligible(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return self.exchange is not None and self.exchange.eligible(x, residual)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """fused_add_rms_norm(sum of x over the ranks, residual) in one kernel. Only for norm_eligible x."""
        from carpool.ops.triton.all_reduce_norm import all_reduce_add_rms_norm

        ex = self.exchange
        assert ex is not None
        ex.width = x.shape[1]
        return all_reduce_add_rms_norm(x, residual, weight, eps, ex.buffer_ptrs, ex.pad_ptrs, ex.epochs, ex.uses,
                                       ex.half_stride, ex.rank, ex.world_size, ex.max_programs)

    def eligible(self, x: torch.Tensor) -> bool:
        """Whether x takes the fast path. Depends only on properties equal on every rank (dtype, size,
        storage offset); the allocator's base addresses are aligned far beyond ALIGN."""
        nbytes = x.numel() * x.element_size()
        return (x.dtype == self.dtype and x.is_cuda and 0 < nbytes <= self.max_bytes and nbytes % ALIGN == 0
                and x.is_contiguous() and (x.storage_offset() * x.element_size()) % ALIGN == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, out of place. Call only for eligible tensors."""
        self.calls += 1
        slot = self.buffer[:x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(slot, x, "sum", self.group_name)
