"""Where a step's time goes, as JSON: a torch.profiler window over engine steps (device time by kernel
category), and a per-step breakdown of host and device time (`step_breakdown`). Under tensor
parallelism both come from rank 0, through the executor's `profile` and `timings` commands."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch

from carpool.profiling import (
    DeviceActivity,
    device_activity,
    device_kernel_times,
    device_timeline,
    step_timings_summary,
)

CATEGORIES = (
    ("communication", ("nccl", "all_reduce", "allreduce", "one_shot", "all_gather", "allgather", "broadcast",
                       "symm_mem", "cross_device")),
    ("attention", ("decode_kernel", "prefill", "_merge_kernel", "attention")),
    ("rope+kv_store", ("rope_store_kv",)),
    ("kv_store", ("store_kv",)),
    ("matmul", ("gemm", "gemv", "cutlass", "nvjet", "sm90_", "cublas", "xmma", "splitk")),
    ("norm", ("rms_norm",)),
    ("rope", ("rotary",)),
    ("activation", ("silu",)),
    ("sampling", ("sample", "argmax", "softmax", "exponential", "topk", "sort")),
    ("memcpy", ("memcpy", "memset")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_steps(engine: Any, num_steps: int, top: int = 15, cpu: bool = True) -> dict[str, Any]:
    """Profile up to num_steps engine steps (all of them with num_steps <= 0: the whole workload);
    cpu=False records device activity only, which keeps the profiler's overhead low on long windows."""
    executor = engine.core.executor
    if hasattr(executor, "profile"):  # tensor parallel: rank 0 profiles itself
        executor.profile("start")
        steps = _run_steps(engine, num_steps)
        report = executor.profile("stop") or {"kernels": [], "span_us": 0.0, "busy_us": 0.0,
                                               "idle_by_transition_us": {}}
        summary = summarize_kernels([(k[0], k[1], k[2]) for k in report["kernels"]], steps, top)
        by_name = DeviceActivity(report["span_us"], report["busy_us"], report["idle_by_transition_us"])
        timeline = report.get("timeline", [])
    else:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
        torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            steps = _run_steps(engine, num_steps)
            torch.cuda.synchronize()
        summary = summarize_kernels(device_kernel_times(prof), steps, top)
        by_name = device_activity(prof, lambda name: name)
        timeline = device_timeline(prof)
    # idle time between kernel names, grouped by category (and the largest by name, below)
    raw = by_name.idle_by_transition
    idle: dict[str, float] = {}
    for key, us in raw.items():
        before, _, after = key.partition(" -> ")
        label = f"{category(before)} -> {category(after)}"
        idle[label] = idle.get(label, 0.0) + us
    act = DeviceActivity(by_name.span, by_name.busy, idle)
    # idle: launch gaps between kernels (cuBLAS kernels sit outside the PDL chain) and host waits
    summary.update(device_span_ms_per_step=act.span / 1e3 / max(steps, 1),
                   device_busy_ms_per_step=act.busy / 1e3 / max(steps, 1),
                   device_idle_share=round(1 - act.busy / act.span, 4) if act.span else 0.0,
                   idle_ms_per_step_by_transition={k: round(us / 1e3 / max(steps, 1), 4) for k, us in
                                                   sorted(act.idle_by_transition.items(), key=lambda kv: -kv[1])[:10]})
    # the same by kernel name, for the categories that hide where a gap is ("other -> other")
    summary["idle_ms_per_step_top_kernel_transitions"] = {
        " -> ".join(n[:60] for n in k.split(" -> ")): round(us / 1e3 / max(steps, 1), 4)
        for k, us in sorted(raw.items(), key=lambda kv: -kv[1])[:8]}
    summary["last_step_critical_path"] = critical_path(timeline, round(summary["kernels_per_step"]))
    return _with_pdl_flag(engine, summary)


def critical_path(timeline: list[list[Any]], per_step: int) -> dict[str, Any]:
    """What each kernel adds to the step, from the last `per_step` events of a timeline ([name, start,
    end] in order of start): the time by which its end passes the latest end before it. Under PDL a
    kernel's own start..end includes its wait for the kernel before, so durations overlap; these
    increments do not, and they sum to the window's span. Grouped by kernel name (with counts), and
    the whole window in order for reading one layer."""
    window = timeline[-per_step:] if per_step > 0 else []
    if not window:
        return {}
    by_name: dict[str, list[float]] = {}
    rows = []
    latest = window[0][1]
    for name, start, end in window:
        added = max(0.0, end - max(latest, start)) if end > latest else 0.0
        idle_before = max(0.0, start - latest)
        latest = max(latest, end)
        entry = by_name.setdefault(name, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += added
        entry[2] += idle_before
        rows.append([name[:32], round(start - window[0][1], 1), round(end - start, 1), round(added, 1),
                     round(idle_before, 1)])
    return {"span_us": round(latest - window[0][1], 1),
            "by_kernel_us": {n: {"calls": int(c), "adds": round(a, 1), "idle_before": round(i, 1)}
                             for n, (c, a, i) in sorted(by_name.items(), key=lambda kv: -kv[1][1])},
            "events": rows}


def _with_pdl_flag(engine: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Under PDL (on unless --no-pdl, on Hopper) a kernel starts before the previous one ends and its
    time includes that wait: kernel times overlap, and their sum exceeds the step's device time."""
    config = engine.config
    summary["pdl"] = config.kernel_backend == "triton" and config.kernels.pdl
    return summary


def _run_steps(engine: Any, num_steps: int) -> int:
    steps = 0
    while (num_steps <= 0 or steps < num_steps) and engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps


def summarize_kernels(kernels: list[tuple[str, float, int]], steps: int, top: int = 15) -> dict[str, Any]:
    """kernels: (name, device microseconds, calls) over `steps` engine steps."""
    kernels = sorted(kernels, key=lambda k: -k[1])
    total = sum(k[1] for k in kernels) or 1.0
    by_cat: dict[str, float] = {}
    for name, us, _ in kernels:
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + us
    steps = max(steps, 1)
    return {
        "steps": steps,
        "device_ms_total": total / 1e3,
        "device_ms_per_step": total / 1e3 / steps,
        "kernels_per_step": sum(k[2] for k in kernels) / steps,
        "share_by_category": {c: round(us / total, 4) for c, us in sorted(by_cat.items(), key=lambda x: -x[1])},
        "top_kernels": [{"name": n[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": c / steps,
                         "share": round(us / total, 4)} for n, us, c in kernels[:top]],
    }


class JitCompiles:
    """Counts the Triton kernel specializations this process builds (or loads from the disk cache)
    while active, and the wall time they take. Why: a timed run should contain none; one compile is
    100+ ms that a long-running server pays once, and it once made two runs of the same workload in
    one suite differ by 6%. Counts this process only: under tensor parallelism the workers compile, so
    pass counted=False there and the summary is None (not measured)."""

    def __init__(self, counted: bool = True) -> None:
        self.counted = counted
        self.kernels: Counter[str] = Counter()
        self.seconds = 0.0
        self._start = 0.0
        self._runtime: Any = None

    def __enter__(self) -> "JitCompiles":
        if not self.counted:
            return self
        try:
            from triton import knobs
        except ImportError:  # older Triton without hooks: nothing counted
            return self
        self._runtime = knobs.runtime
        self._prev = (self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook)

        def on_miss(**kwargs: Any) -> Any:
            self._start = time.perf_counter()
            return self._prev[0](**kwargs) if self._prev[0] else None

        def on_built(**kwargs: Any) -> Any:
            self.seconds += time.perf_counter() - self._start
            self.kernels[kwargs["fn"].name] += 1
            return self._prev[1](**kwargs) if self._prev[1] else None

        self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook = on_miss, on_built
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._runtime is not None:
            self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook = self._prev

    def summary(self) -> dict[str, Any] | None:
        if not self.counted:
            return None
        return {"count": sum(self.kernels.values()), "seconds": round(self.seconds, 3),
                "kernels": dict(self.kernels.most_common())}


def start_timings(engine: Any) -> None:
    """Collect per-step timings from now on (rank 0's under tensor parallelism)."""
    executor = engine.core.executor
    if hasattr(executor, "timings"):
        executor.timings(enable=True)
    else:
        executor.runner.timings.clear()
        executor.runner.collect_timings = True


def stop_timings(engine: Any, wall_s: float, num_steps: int) -> dict[str, Any]:
    """Per-step means and medians (ms) since start_timings, with how to read them:
    - wall_ms_per_step: engine wall time / engine steps;
    - rank0.gpu_ms: device time of a step (first to last kernel; includes all-reduce waits);
    - rank0.device_gap_ms: device idle between consecutive steps: host overhead the overlap did not hide;
    - rank0.launch_ms / resolve_wait_ms: host time to enqueue a step / blocked on its tokens;
    - (TP) rank0.recv_wait_ms: rank 0 idle waiting for the engine's next command; decode_ms / reply_ms:
      JSON in and out; engine.send_ms / reply_wait_ms: the engine writing a step / waiting for a reply.
    """
    executor = engine.core.executor
    out: dict[str, Any] = {"wall_ms_per_step": 1e3 * wall_s / max(num_steps, 1), "engine_steps": num_steps}
    if hasattr(executor, "timings"):
        out.update(executor.timings(enable=False))
        out.update(executor.describe())
        return out
    runner = executor.runner
    runner.collect_timings = False
    out["rank0"] = step_timings_summary(runner.timings)
    return out


def step_breakdown(engine: Any, prompt: list[int], params: Any) -> dict[str, Any]:
    """Run one request to completion with per-step timings on (see stop_timings)."""
    import time

    start_timings(engine)
    engine.add_request(None, {"prompt_token_ids": prompt}, params)
    steps = 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return stop_timings(engine, time.perf_counter() - start, steps)
