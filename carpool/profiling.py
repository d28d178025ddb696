"""Timing summaries shared by the benchmarks (profile_util) and the TP processes: device kernel times and
device busy time out of a torch.profiler run, and millisecond statistics of per-step timings."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DeviceActivity:
    """Device time in a profile, in microseconds: `span` from the first start to the last end, `busy` the
    part of it during which some kernel or copy ran (the union of their intervals, so kernels that
    overlap under PDL count once). span - busy is device idle time: launch gaps between kernels and waits
    for the host; `idle_by_transition` splits it by "A -> B", the labels of the kernel that finished last
    before each gap and of the one after it (e.g. boundaries a cuBLAS GEMM takes part in, outside the PDL
    chain)."""
    span: float
    busy: float
    idle_by_transition: dict[str, float]


def _device_events(prof: Any) -> list[tuple[float, float, str]]:
    """(start, end, name) of every device event (kernel, copy) in `prof`, in start order."""
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if str(getattr(e, "device_type", "")).endswith("CUDA"))


def device_activity(prof: Any, label: Callable[[str], str]) -> DeviceActivity:
    """DeviceActivity of the device events in `prof` (one pass over them, in start order)."""
    events = _device_events(prof)
    idle: dict[str, float] = {}
    if not events:
        return DeviceActivity(0.0, 0.0, idle)
    run_start, run_end, last = events[0]
    busy = 0.0
    for start, end, name in events[1:]:
        if start > run_end:
            busy += run_end - run_start
            key = f"{label(last)} -> {label(name)}"
            idle[key] = idle.get(key, 0.0) + start - run_end
            run_start = start
        if end >= run_end:
            run_end, last = end, name
    busy += run_end - run_start
    return DeviceActivity(float(run_end - events[0][0]), float(busy), idle)


# Device events a profile's timeline keeps: more than two batch-1 decode steps of an 8B model.
TIMELINE_EVENTS = 800


def device_timeline(prof: Any, last: int = TIMELINE_EVENTS) -> list[list[Any]]:
    """The last `last` device events of `prof` in start order, as [name, start, end] with times in
    microseconds from the first of them: enough to read one step's critical path kernel by kernel."""
    events = _device_events(prof)[-last:]
    if not events:
        return []
    t0 = events[0][0]
    return [[name[:48], round(float(start - t0), 2), round(float(end - t0), 2)] for start, end, name in events]


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
