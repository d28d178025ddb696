"""Device detection: which device to run on, which kernels to use there, which collective backend."""

from __future__ import annotations

import importlib.util

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
