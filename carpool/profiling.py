"""Device kernel times out of a torch.profiler run, shared by the benchmarks' profiles (profile_util)
and the TP worker's rank-0 profile."""

from __future__ import annotations

from typing import Any


def device_kernel_times(prof: Any) -> list[tuple[str, float, int]]:
    """(kernel name, device microseconds, calls) of every device activity in `prof`, longest first."""
    kernels = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "self_cuda_time_total", 0)
        if device_us and str(getattr(e, "device_type", "")).endswith("CUDA"):
            kernels.append((e.key, float(device_us), int(e.count)))
    return sorted(kernels, key=lambda k: -k[1])
