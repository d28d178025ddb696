"""Timing summaries shared by the benchmarks (profile_util) and the TP processes: device kernel times out
of a torch.profiler run, and millisecond statistics of per-step timings."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from carpool.worker.model_runner import StepTiming


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


def ms_stats(seconds: list[float]) -> dict[str, float]:
    """Mean and median in milliseconds of per-step durations in seconds (zeros for none)."""
    if not seconds:
        return {"mean": 0.0, "median": 0.0}
    return {"mean": 1e3 * statistics.fmean(seconds), "median": 1e3 * statistics.median(seconds)}


def step_timings_summary(timings: list[StepTiming]) -> dict[str, Any]:
    """A model runner's per-step timings (ModelRunner.timings) as millisecond statistics."""
    return {"steps": len(timings), "launch_ms": ms_stats([t.launch_s for t in timings]),
            "resolve_wait_ms": ms_stats([t.wait_s for t in timings]), "gpu_ms": ms_stats([t.gpu_s for t in timings]),
            "device_gap_ms": ms_stats([t.gap_s for t in timings])}
