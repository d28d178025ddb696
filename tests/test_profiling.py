"""device_kernel_times: which profiler rows count as device kernels, and their order; device_activity: the
union of device intervals and the idle time between them; step timing statistics."""

from __future__ import annotations

from types import SimpleNamespace

from carpool.profiling import device_kernel_times


def test_device_kernel_times_keeps_device_rows_longest_first() -> None:
    rows = [SimpleNamespace(key="cpu_op", self_device_time_total=0.0, device_type="DeviceType.CPU", count=3),
            SimpleNamespace(key="gemv", self_device_time_total=30.0, device_type="DeviceType.CUDA", count=2),
            SimpleNamespace(key="norm", self_device_time_total=5.0, device_type="DeviceType.CUDA", count=4),
            SimpleNamespace(key="host_side", self_device_time_total=7.0, device_type="DeviceType.CPU", count=1),
            # an older torch names the field self_cuda_time_total
            SimpleNamespace(key="old", self_cuda_time_total=12.0, device_type="DeviceType.CUDA", count=1)]
    prof = SimpleNamespace(key_averages=lambda: rows)
    assert device_kernel_times(prof) == [("gemv", 30.0, 2), ("old", 12.0, 1), ("norm", 5.0, 4)]


def test_step_timings_summary_in_milliseconds() -> None:
    from carpool.profiling import ms_stats, step_timings_summary
    from carpool.worker.model_runner import StepTiming

    timings = [StepTiming(launch_s=0.001, wait_s=0.0, gpu_s=0.004, gap_s=0.0),
               StepTiming(launch_s=0.003, wait_s=0.002, gpu_s=0.006, gap_s=0.001)]
    summary = step_timings_summary(timings)
    assert summary["steps"] == 2
    assert summary["launch_ms"]["mean"] == summary["launch_ms"]["median"] == 2.0
    assert summary["gpu_ms"]["mean"] == 5.0 and summary["device_gap_ms"]["median"] == 0.5
    assert ms_stats([]) == {"mean": 0.0, "median": 0.0}


def event(start: float, end: float, name: str = "kernel", device: str = "DeviceType.CUDA") -> SimpleNamespace:
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device)


def test_device_busy_is_the_union_of_device_intervals() -> None:
    from carpool.profiling import device_activity

    # 10-20 and 15-30 overlap (PDL) -> 10-30; a gap to 32-40; one inside another; a host event ignored
    events = [event(32, 40), event(10, 20), event(15, 30), event(33, 35), event(0, 100, device="DeviceType.CPU")]
    act = device_activity(SimpleNamespace(events=lambda: events), str)
    assert (act.span, act.busy) == (30.0, 28.0)
    empty = device_activity(SimpleNamespace(events=lambda: []), str)
    assert (empty.span, empty.busy, empty.idle_by_transition) == (0.0, 0.0, {})


def test_device_idle_by_transition_names_the_kernels_around_each_gap() -> None:
    from carpool.profiling import device_activity

    # gemm 0-10, gap 2, norm 12-14 overlapped by rope 13-20 (PDL), gap 3, gemm 23-30, gap 1, decode 31-40
    events = [event(0, 10, "nvjet_gemm"), event(12, 14, "_rms_norm_kernel"), event(13, 20, "_rope_kernel"),
              event(23, 30, "nvjet_gemm"), event(31, 40, "_decode_kernel"),
              event(0, 99, "cpu_op", device="DeviceType.CPU")]
    label = lambda name: "gemm" if "gemm" in name else "triton"  # noqa: E731
    act = device_activity(SimpleNamespace(events=lambda: events), label)
    assert act.idle_by_transition == {"gemm -> triton": 3.0, "triton -> gemm": 3.0}
    assert act.span - act.busy == 6.0


def test_tensor_parallel_profile_groups_rank0_transitions_by_category() -> None:
    """Rank 0 reports idle time between kernel names; the benchmarks' summary groups it by category."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import profile_util

    report = {"kernels": [["_gemv_kernel", 100.0, 4], ["_rms_norm_kernel", 10.0, 2]], "span_us": 400.0,
              "busy_us": 300.0, "idle_by_transition_us": {"_gemv_kernel -> _rms_norm_kernel": 20.0,
                                                           "_gemv_kernel -> _fused_rms_norm_x": 30.0,
                                                           "_rms_norm_kernel -> _gemv_kernel": 50.0}}
    executor = SimpleNamespace(profile=lambda action: report if action == "stop" else None)
    engine = SimpleNamespace(core=SimpleNamespace(executor=executor),
                             has_unfinished_requests=lambda: False,
                             config=SimpleNamespace(kernel_backend="triton", kernels=SimpleNamespace(pdl=True)))
    summary = profile_util.profile_steps(engine, 5)
    gemv, norm = profile_util.category("_gemv_kernel"), profile_util.category("_rms_norm_kernel")
    assert summary["device_idle_share"] == 0.25 and summary["device_span_ms_per_step"] == 0.4
    assert summary["idle_ms_per_step_by_transition"] == {f"{gemv} -> {norm}": 0.05, f"{norm} -> {gemv}": 0.05}
    assert list(summary["idle_ms_per_step_top_kernel_transitions"].items())[0] == (
        "_rms_norm_kernel -> _gemv_kernel", 0.05)  # by name too, largest first


def test_critical_path_counts_what_each_kernel_adds_past_the_latest_end() -> None:
    """Under PDL a kernel starts before the one it waits for ends: its increment, not its duration,
    is its share of the step; increments and idle gaps sum to the window's span."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import profile_util

    timeline = [["old", -5.0, 0.0], ["gemv", 0.0, 10.0], ["norm", 2.0, 15.0], ["gemv", 20.0, 25.0],
                ["copy", 21.0, 24.0]]
    path = profile_util.critical_path(timeline, 4)  # the last four events
    assert path["span_us"] == 25.0
    assert path["by_kernel_us"]["gemv"] == {"calls": 2, "adds": 15.0, "idle_before": 5.0}
    assert path["by_kernel_us"]["norm"]["adds"] == 5.0 and path["by_kernel_us"]["copy"]["adds"] == 0.0
    assert [row[3] for row in path["events"]] == [10.0, 5.0, 5.0, 0.0]
    assert profile_util.critical_path([], 4) == {}


def test_jit_compiles_counts_specializations_built_while_active_and_restores_hooks() -> None:
    """The benchmarks' compile counter rides on Triton's cache-miss and post-compile hooks."""
    import os
    import sys

    import pytest

    knobs = pytest.importorskip("triton").knobs
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import profile_util

    seen: list[str] = []
    before = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda **kw: seen.append(kw["fn"].name)
    try:
        with profile_util.JitCompiles() as compiles:
            for name in ("_decode_kernel", "_decode_kernel", "_gemv_kernel"):
                assert knobs.runtime.jit_cache_hook(key=name) is None  # None: Triton goes on to compile
                knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(name=name))
        assert compiles.summary()["count"] == 3
        assert compiles.summary()["kernels"] == {"_decode_kernel": 2, "_gemv_kernel": 1}
        assert seen == ["_decode_kernel", "_decode_kernel", "_gemv_kernel"]  # an earlier hook still runs
        knobs.runtime.jit_post_compile_hook(fn=SimpleNamespace(name="after"))
        assert compiles.summary()["count"] == 3 and seen[-1] == "after"
        hooks = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        with profile_util.JitCompiles(counted=False) as uncounted:  # (TP: the workers compile)
            assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == hooks  # not installed
        assert uncounted.summary() is None
    finally:
        knobs.runtime.jit_post_compile_hook = before
