"""Timing summaries shared by the benchmarks (profile_util) and the TP processes: device kernel times and
device busy time out of a torch.profiler run, and millisecond statistics of per-step timings."""

from __future__ import annotations

import statistics
from collections.abc import Callable
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


def device_idle_by_transition(prof: Any, label: Callable[[str], str]) -> dict[str, float]:
    """Device idle microseconds in `prof`, by the transition they sit in: "A -> B" where A = label(name)
    of the kernel that finished last before the gap and B that of the one after it. Shows which kernel
    boundaries (e.g. the ones a cuBLAS GEMM takes part in, outside the PDL chain) the idle time of
    device_busy comes from."""
    events = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                    if str(getattr(e, "device_type", "")).endswith("CUDA"))
    idle: dict[str, float] = {}
    if not events:
        return idle
    run_end, last = events[0][1], events[0][2]
    for start, end, name in events[1:]:
        if start > run_end:
            key = f"{label(last)} -> {label(name)}"
            idle[key] = idle.get(key, 0.0) + start - run_end
        if end >= run_end:
            run_end, last = end, name
    return idle


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
