"""Timing summaries shared by the benchmarks (profile_util) and the TP processes: device kernel times and
device busy time out of a torch.profiler run, and millisecond statistics of per-step timings."""

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


def device_busy(prof: Any) -> tuple[float, float]:
    """(span, busy) in device microseconds of the device activity in `prof`: from its first start to its
    last end, and the part of that during which some kernel or copy ran (the union of their intervals,
    so kernels that overlap under PDL count once). span - busy is device idle time: launch gaps between
    kernels and waits for the host."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if str(getattr(e, "device_type", "")).endswith("CUDA"))
    if not intervals:
        return 0.0, 0.0
    busy, run_start, run_end = 0.0, intervals[0][0], intervals[0][1]
    for start, end in intervals[1:]:
        if start > run_end:
            busy += run_end - run_start
            run_start, run_end = start, end
        else:
            run_end = max(run_end, end)
    busy += run_end - run_start
    return float(max(end for _, end in intervals) - intervals[0][0]), float(busy)


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
