"""Device detection: which device to run on, which kernels to use there, which collective backend; and
the one way per-step host data goes to the device."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_backend_for(device: str) -> str:
    """Triton kernels on CUDA GPUs; the PyTorch reference kernels everywhere else."""
    return "triton" if device.startswith("cuda") and triton_available() else "torch"


def dist_backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def to_device(a: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of host data, queued without making the host wait. A plain `.to(device)` from
    NumPy memory waits for all queued device work (and so breaks the overlap of host and device), and
    even a non-blocking copy from pageable memory goes through a driver staging buffer; this one copies
    from a pinned block of PyTorch's caching host allocator, which keeps the block from reuse until the
    copy has run. On CPU: the data as a tensor on `device`."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a.contiguous()
    if device.type != "cuda":
        return t.to(device)
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # (a copy even if t is pinned: the
    pinned.copy_(t)  # caller may reuse its memory before the device has read it)
    return pinned.to(device, non_blocking=True)
