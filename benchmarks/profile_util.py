"""A torch.profiler window over engine steps, summarized as JSON: where the device time goes."""

from __future__ import annotations

from typing import Any

import torch

CATEGORIES = (
    ("attention", ("decode_kernel", "prefill", "_merge_kernel", "attention")),
    ("rope+kv_store", ("rope_store_kv",)),
    ("kv_store", ("store_kv",)),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_", "cublas", "xmma", "splitk")),
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
    """Profile up to num_steps engine steps (all of them with num_steps <= 0: the whole workload)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        steps = 0
        while (num_steps <= 0 or steps < num_steps) and engine.has_unfinished_requests():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
    return summarize(prof, steps, top)


def summarize(prof: Any, steps: int, top: int = 15) -> dict[str, Any]:
    kernels = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "self_cuda_time_total", 0)
        is_device = str(getattr(e, "device_type", "")).endswith("CUDA")
        if device_us and is_device:
            kernels.append((e.key, device_us, e.count))
    kernels.sort(key=lambda k: -k[1])
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
