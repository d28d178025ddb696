"""FSDP2 scaling of `carpool train` over the GPUs of one host: N GPUs against one at the same per-GPU
micro-batch, on the ~1B Llama shape of bench_train.py (sequence 4096, bf16 compute, fp32 master weights),
with the loss curves of both runs compared step by step and a profile of the N-GPU run's rank 0 that
says how much of the FSDP communication overlaps compute. Prints one JSON object.

    python benchmarks/bench_train_scaling.py [--nproc-per-node 2] [--steps 150] [--micro-batch-size 2]
        [--trace FILE.json.gz] [--out FILE]
    python benchmarks/bench_train_scaling.py --tiny --device cpu --steps 6 --warmup 2   # gloo on CPU (CI test)
        [--no-explicit-prefetch]

The two runs (each its own processes, started like torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
nothing is pickled) see the same tokens at every optimizer step:
- `one`: 1 process (GPU 0), micro-batch b, gradient accumulation N;
- `many`: N processes (GPUs 0..N-1), micro-batch b each, no accumulation.
The loader hands global stream position g to rank g mod N (PackedLoader), so step s of both runs covers
positions [s·N·b, (s+1)·N·b) — the same N·b sequences, only grouped differently — and the trainer
normalizes every step by the global label count, so both compute the gradient of the same mean loss.
The losses differ only by rounding (the order of the gradient sums): fp32 on CPU agrees to ~1e-6; bf16
is compared against --loss-rtol per step and --loss-mean-rtol on average (stated in the JSON).

Throughput: tokens/s = global tokens per optimizer step (N·b·seq_len in both runs) / mean seconds per
step over the steps after --warmup. Each GPU runs micro-batches of b in both runs and the optimizer step
is amortized over N·b sequences in both (the `one` run's AdamW updates all parameters once per N
micro-batches, each of the N ranks 1/N of them once per micro-batch), so `tokens_per_s_ratio`
(many / one) is N for perfect scaling; the target is 0.925·N (1.85 on two GPUs).

Overlap (N-GPU run, rank 0, --profile-steps more steps after the measured ones; a chrome trace of them to
--trace): on the device timeline, the time during which some NCCL kernel runs is U(nccl), the time
during which some other kernel runs is U(compute); `overlap_fraction` = |U(nccl) ∩ U(compute)| / |U(nccl)|,
also per collective (all-gather: FSDP's parameter gathers; reduce-scatter: its gradient reductions).
An NCCL kernel's duration includes time it waits for the peer rank, which is counted like transfer time.
On CPU (gloo, no kernels) `prefetch_in_flight_fraction` says instead, from FSDP2's record_function ranges,
for how many decoder layers the collective was issued before, and waited on after, the compute of the layer
run before it (forward all-gathers, backward re-gathers, reduce-scatters; fsdp_schedule, GatherWindow):
the schedule that lets a GPU overlap them. --no-explicit-prefetch shows the forward without it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import LLAMA_1B, TINY, _free_port, _sync  # noqa: E402

TARGET_EFFICIENCY = 0.925  # of N x one GPU's tokens/s (1.85 on two GPUs)
# NVLink multicast stays off in every process this starts (mandatory on the shared hosts).
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ---------------------------------------------------------------------------------------------------------
# Kernel overlap in a chrome trace


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as sorted, disjoint intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(merged: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in merged)


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """|A ∩ B| of two merged (sorted, disjoint) interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _subtract(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A \\ B of two merged (sorted, disjoint) interval lists, as one."""
    out: list[tuple[float, float]] = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


COLLECTIVES = {"all_gather": "allgather", "reduce_scatter": "reducescatter", "all_reduce": "allreduce"}


def kernel_overlap(trace_events: list[dict[str, Any]]) -> dict[str, Any]:
    """Device-kernel overlap of NCCL and compute in a chrome trace's events (microseconds).

    Kernels are the complete events of category "kernel"; a kernel whose name contains "nccl" is
    communication, any other is compute. Each figure is a length of a union of intervals, so kernels
    that run at once on several streams count once. Per group (all NCCL kernels, and each collective):
    `us` busy time, `overlap_us` the part of it during which compute ran too, `exposed_us` the rest,
    `overlap_fraction` = overlap_us / us (None without such kernels: CPU runs, gloo)."""
    kernels = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), str(e.get("name", "")))
               for e in trace_events if e.get("cat") == "kernel" and e.get("ph", "X") == "X" and "dur" in e]
    nccl = [k for k in kernels if "nccl" in k[2].lower()]
    compute = merge_intervals([(s, e) for s, e, name in kernels if "nccl" not in name.lower()])

    def summary(events: list[tuple[float, float, str]]) -> dict[str, Any]:
        union = merge_intervals([(s, e) for s, e, _ in events])
        busy, both = _length(union), _intersection(union, compute)
        return {"kernels": len(events), "us": busy, "overlap_us": both, "exposed_us": busy - both,
                "overlap_fraction": both / busy if busy > 0 else None}

    everything = merge_intervals([(s, e) for s, e, _ in kernels])
    result: dict[str, Any] = {"span_us": everything[-1][1] - everything[0][0] if everything else 0.0,
                              "compute_us": _length(compute), "nccl": summary(nccl)}
    for key, needle in COLLECTIVES.items():
        result[key] = summary([k for k in nccl if needle in k[2].lower().replace("_", "")])
    result["overlap_fraction"] = result["nccl"]["overlap_fraction"]
    return result


# ---------------------------------------------------------------------------------------------------------
# FSDP2's prefetch schedule in a CPU trace (record_function ranges, any backend)

_LAYER_FQN = re.compile(r"^FSDP::(\w+) \((?:.*\.)?layers\.(\d+)\)")


@dataclass(frozen=True)
class GatherWindow:
    """One collective of decoder layer `layer` against the compute of layer `prev_layer`, the one that runs
    before `layer` in that pass (i-1 in forward, i+1 in backward). `issue_us`: where FSDP calls the
    collective; `wait_us`: where it first needs the result (the all-gather's copy-out; for a reduce-scatter,
    the next `post_backward_rs_wait`). On a GPU the issue only enqueues on FSDP's communication stream and
    the wait is a stream wait, so the compute between the two runs while the collective is in flight. On
    CPU, gloo completes a collective before the issuing call returns (FSDP2's unshard_async_op is False),
    so a CPU trace shows that schedule, not concurrency."""
    layer: int
    prev_layer: int
    issue_us: float
    wait_us: float
    prev_compute_start_us: float
    prev_compute_end_us: float
    prev_compute_us: float
    compute_between_us: float  # of prev_layer's compute, inside [issue_us, wait_us]

    @property
    def issued_before_prev_compute_start(self) -> bool:
        return self.issue_us <= self.prev_compute_start_us

    @property
    def issued_before_prev_compute_end(self) -> bool:
        return self.issue_us < self.prev_compute_end_us

    @property
    def waited_after_prev_compute_end(self) -> bool:
        return self.wait_us >= self.prev_compute_end_us

    @property
    def in_flight_during_prev_compute(self) -> bool:
        return self.issued_before_prev_compute_end and self.waited_after_prev_compute_end \
            and self.compute_between_us > 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "issued_before_prev_compute_start": self.issued_before_prev_compute_start,
                "issued_before_prev_compute_end": self.issued_before_prev_compute_end,
                "waited_after_prev_compute_end": self.waited_after_prev_compute_end,
                "in_flight_during_prev_compute": self.in_flight_during_prev_compute}


def _layer_ranges(events: list[dict[str, Any]]) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """(FSDP label, layer index) -> its [start, end) ranges in time order."""
    ranges: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for e in events:
        m = _LAYER_FQN.match(e["name"])
        if m:
            ranges.setdefault((m.group(1), int(m.group(2))), []).append((e["ts"], e["ts"] + e["dur"]))
    return ranges


def _pass_schedule(fsdp: list[dict[str, Any]], ops: list[tuple[float, float]]) -> dict[str, list[GatherWindow]]:
    """The windows of one forward+backward (events from one root pre-forward to the next)."""
    root_post_forward = [e["ts"] for e in fsdp if e["name"] == "FSDP::post_forward"]
    if not root_post_forward:
        return {"forward": [], "backward": [], "reduce_scatter": []}
    split = root_post_forward[0]
    fwd = _layer_ranges([e for e in fsdp if e["ts"] < split])
    bwd = _layer_ranges([e for e in fsdp if e["ts"] >= split])
    hooks = merge_intervals([(e["ts"], e["ts"] + e["dur"]) for e in fsdp])

    def compute(start: float, end: float) -> list[tuple[float, float]]:
        """Operator time in [start, end) outside FSDP's own ranges: the layer's compute."""
        inside = merge_intervals([(max(s, start), min(e, end)) for s, e in ops if s < end and e > start])
        return _subtract(inside, hooks)

    def window(layer: int, prev: int, issue: float, wait: float, begin_label: str, end_label: str,
               ranges: dict[tuple[str, int], list[tuple[float, float]]]) -> GatherWindow | None:
        begin, end = ranges.get((begin_label, prev)), ranges.get((end_label, prev))
        if not begin or not end:
            return None
        work = compute(begin[0][1], end[0][0])
        if not work:
            return None
        return GatherWindow(layer, prev, issue, wait, work[0][0], work[-1][1], _length(work),
                            _intersection(work, [(issue, wait)]) if wait > issue else 0.0)

    layers = sorted({i for _, i in fwd})
    result: dict[str, list[GatherWindow]] = {"forward": [], "backward": [], "reduce_scatter": []}
    for i in layers:
        gather, copy_out = fwd.get(("all_gather", i)), fwd.get(("all_gather_copy_out", i))
        if i - 1 in layers and gather and copy_out:
            w = window(i, i - 1, gather[0][0], copy_out[0][0], "pre_forward", "post_forward", fwd)
            result["forward"] += [w] if w else []
        gather, copy_out = bwd.get(("all_gather", i)), bwd.get(("all_gather_copy_out", i))
        if i + 1 in layers and gather and copy_out:  # none when the weights stay gathered after forward
            w = window(i, i + 1, gather[0][0], copy_out[0][0], "pre_backward", "post_backward_accumulate", bwd)
            result["backward"] += [w] if w else []
        reduce = bwd.get(("post_backward_reduce", i))
        if i - 1 in layers and reduce:
            waits = [e["ts"] for e in fsdp if e["ts"] > reduce[0][1]
                     and e["name"].startswith(("FSDP::post_backward_rs_wait", "FSDP::root_post_backward"))]
            if waits:
                w = window(i, i - 1, reduce[0][0], waits[0], "pre_backward", "post_backward_accumulate", bwd)
                result["reduce_scatter"] += [w] if w else []
    return result


def fsdp_schedule(trace_events: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether FSDP2's collectives of each decoder layer were issued before, and waited on after, the
    compute of the layer that runs before it, read from the `FSDP::*` record_function ranges of a torch
    profiler trace (CPU activities suffice; see GatherWindow). FSDP2 names a layer's ranges with its
    module path ("FSDP::all_gather (model.layers.3)"); each `FSDP::root_pre_forward` starts a pass.

    - forward: layer i's all-gather (i >= 1) against layer i-1's forward;
    - backward: layer i's re-gather (reshard_after_forward) against layer i+1's backward;
    - reduce_scatter: layer i's gradient reduction (i >= 1) against layer i-1's backward.
    Per kind: the windows, `fraction_in_flight` of them whose collective was outstanding during some of
    the previous layer's compute, and `compute_between_us`, that compute summed (None: no windows)."""
    marks = [e for e in trace_events if e.get("ph") == "X" and "dur" in e]
    fsdp = sorted((e for e in marks if str(e.get("name", "")).startswith("FSDP::")), key=lambda e: e["ts"])
    roots = [e for e in fsdp if e["name"] == "FSDP::root_pre_forward"]
    if not roots:
        return {"passes": 0, **{k: {"windows": [], "fraction_in_flight": None, "compute_between_us": None}
                                for k in ("forward", "backward", "reduce_scatter")}}
    main_thread = roots[0]["tid"]
    # Operators of the main thread, less autograd's per-node wrapper ranges: those hold the FSDP hooks the
    # node runs (pre-backward, prefetch), and the operators they also hold are listed on their own.
    ops = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in marks
           if e.get("cat") == "cpu_op" and e.get("tid") == main_thread
           and not str(e.get("name", "")).startswith("autograd::engine::evaluate_function")]
    starts = [e["ts"] for e in roots] + [math.inf]
    windows: dict[str, list[GatherWindow]] = {"forward": [], "backward": [], "reduce_scatter": []}
    for lo, hi in zip(starts, starts[1:]):
        one = _pass_schedule([e for e in fsdp if lo <= e["ts"] < hi and e["tid"] == main_thread],
                             [o for o in ops if lo <= o[0] < hi])
        for kind in windows:
            windows[kind] += one[kind]
    result: dict[str, Any] = {"passes": len(roots)}
    for kind, ws in windows.items():
        result[kind] = {"windows": [w.to_dict() for w in ws],
                        "fraction_in_flight": sum(w.in_flight_during_prev_compute for w in ws) / len(ws)
                        if ws else None,
                        "compute_between_us": sum(w.compute_between_us for w in ws) if ws else None,
                        "prev_compute_us": sum(w.prev_compute_us for w in ws) if ws else None}
    return result


# ---------------------------------------------------------------------------------------------------------
# Data: learnable synthetic tokens


def phrase_tokens(num_tokens: int, vocab_size: int, seed: int = 0, num_phrases: int = 8192,
                  phrase_len: int = 16) -> np.ndarray:
    """A stream of fixed random phrases drawn with Zipf-like frequencies: after a phrase's first token
    the rest is predictable, so the loss falls well below log(vocab) within the first hundred steps
    (random tokens would give a flat curve, which matches trivially)."""
    rng = np.random.default_rng(seed)
    phrases = rng.integers(3, vocab_size, (num_phrases, phrase_len))  # ids 0-2: bos, eos, pad
    weights = 1.0 / np.arange(1, num_phrases + 1) ** 1.1
    picks = rng.choice(num_phrases, size=-(-num_tokens // phrase_len), p=weights / weights.sum())
    return phrases[picks].reshape(-1)[:num_tokens]


# ---------------------------------------------------------------------------------------------------------
# One rank of one run (started by the launcher below with --worker SPEC.json)


def run_worker(spec_path: str) -> None:
    """Train spec["steps"] steps (losses and seconds of each), then spec["profile_steps"] more, profiled
    on rank 0 when spec["trace"] is set; writes this rank's result JSON."""
    import torch

    from carpool.training.config import TrainConfig
    from carpool.training.trainer import Trainer

    with open(spec_path) as f:
        spec = json.load(f)
    if spec["threads_per_rank"]:
        torch.set_num_threads(spec["threads_per_rank"])
    trainer = Trainer(TrainConfig.from_dict(spec["config"]))
    rank, device = trainer.dist.rank, trainer.device
    result: dict[str, Any] = {"rank": rank, "world_size": trainer.dist.world_size, "device": str(device)}
    try:
        if rank == 0 and spec.get("measure_matmul") and device.type == "cuda":
            from common import measure_matmul_flops

            result["matmul_flops_measured"] = measure_matmul_flops(str(device))
        losses, seconds = [], []
        for i in range(spec["steps"]):
            if i == spec["warmup"] and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats = trainer.train_step()  # waits for its loss: seconds are whole steps
            losses.append(stats.loss)
            seconds.append(stats.seconds)
        result.update(losses=losses, step_seconds=seconds, num_params=trainer.num_params,
                      memory_estimate=trainer.memory_estimate(),
                      peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30
                      if device.type == "cuda" else None)
        if spec["profile_steps"]:
            result["profile"] = _profile(trainer, spec["profile_steps"], spec["trace"] if rank == 0 else None)
    finally:
        trainer.close()
    with open(spec["result"].format(rank=rank), "w") as f:
        json.dump(result, f)


def _profile(trainer: Any, steps: int, trace: str | None) -> dict[str, Any] | None:
    """`steps` more steps on every rank (they are collectives); rank 0 (trace given) records them."""
    from torch.profiler import ProfilerActivity, profile

    if trace is None:
        for _ in range(steps):
            trainer.train_step()
        return None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    losses = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            losses.append(trainer.train_step().loss)
        _sync(trainer.device)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as f:
            data = f.read()
    events = json.loads(data).get("traceEvents", [])
    os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
    with gzip.open(trace, "wb") as f:
        f.write(data)
    result = {"steps": steps, "losses": losses, "trace": trace, "trace_bytes_gz": os.path.getsize(trace),
              **kernel_overlap(events)}
    if trainer.device.type == "cpu":  # no device timeline: the schedule of FSDP's collectives instead
        result["fsdp_schedule"] = fsdp_schedule(events)
    return result


# ---------------------------------------------------------------------------------------------------------
# The launcher


def launch(world: int, spec: dict[str, Any], workdir: str, name: str, timeout_s: float) -> list[dict[str, Any]]:
    """Run `world` ranks of run_worker; every rank's result, rank order. If a rank fails or the run
    outlasts timeout_s, the other ranks are ended (a rank left alone would wait in a collective forever)."""
    spec_path = os.path.join(workdir, f"{name}.spec.json")
    result_path = os.path.join(workdir, f"{name}.rank{{rank}}.json")
    with open(spec_path, "w") as f:
        json.dump({**spec, "result": result_path}, f)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, **NO_MULTICAST, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path], env=env))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                raise RuntimeError(f"run {name}: rank(s) {failed} exited with {[procs[r].returncode for r in failed]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {name}: still running after {timeout_s:.0f} s")
            time.sleep(0.2)
        failed = [r for r, p in enumerate(procs) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"run {name}: rank(s) {failed} exited with {[procs[r].returncode for r in failed]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    results = []
    for rank in range(world):
        with open(result_path.format(rank=rank)) as f:
            results.append(json.load(f))
    return results


def summarize_run(ranks: list[dict[str, Any]], warmup: int, tokens_per_step: int, flops_per_token: float,
                  matmul_flops: float | None) -> dict[str, Any]:
    r0 = ranks[0]
    timed = r0["step_seconds"][warmup:]
    step_s = sum(timed) / len(timed)
    tps = tokens_per_step / step_s
    world = r0["world_size"]
    return {
        "world_size": world, "step_s": step_s, "step_s_min": min(timed), "step_s_max": max(timed),
        "tokens_per_step": tokens_per_step, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / world,
        "mfu_vs_measured_matmul": flops_per_token * tps / world / matmul_flops if matmul_flops else None,
        "losses": r0["losses"], "peak_memory_gib_per_rank": [r["peak_memory_gib"] for r in ranks],
        "memory_estimate_gib": r0["memory_estimate"]["total_gib"],
    }


def compare_losses(one: list[float], many: list[float], rtol: float, mean_rtol: float) -> dict[str, Any]:
    """Step-by-step relative difference of the N-rank losses from the one-rank ones."""
    rel = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(one, many)]
    finite = all(math.isfinite(x) for x in one + many)
    return {
        "steps": len(rel), "max_abs_diff": max(abs(b - a) for a, b in zip(one, many)),
        "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel), "rtol": rtol, "mean_rtol": mean_rtol,
        "tolerance": f"every step |many - one| <= {rtol} x |one| and the mean of those ratios <= {mean_rtol}",
        "last10_mean_rel_diff": abs(sum(many[-10:]) - sum(one[-10:])) / max(abs(sum(one[-10:])), 1e-12),
        "first_loss": one[0], "last_loss": one[-1], "finite": finite,
        "match": finite and len(one) == len(many) and max(rel) <= rtol and sum(rel) / len(rel) <= mean_rtol,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc-per-node", type=int, default=2, help="GPUs (or gloo ranks) of the scaled run")
    ap.add_argument("--tiny", action="store_true", help="a toy shape (CPU smoke test)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--seq-len", type=int, default=None, help="default 4096 (64 with --tiny)")
    ap.add_argument("--micro-batch-size", type=int, default=2, help="sequences per GPU per forward, both runs")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of each run (all in the loss curves)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    ap.add_argument("--profile-steps", type=int, default=2, help="profiled steps of the N-rank run (0: none)")
    ap.add_argument("--trace", default=None, help="chrome trace of those steps on rank 0 (.json.gz)")
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32"], help="default bf16 (fp32 on CPU)")
    ap.add_argument("--activation-checkpointing", default="off", choices=["off", "on", "selective"])
    ap.add_argument("--no-explicit-prefetch", action="store_true",
                    help="leave FSDP2 to prefetch on its own (parallel.explicit_prefetch = false)")
    ap.add_argument("--loss-chunk-size", type=int, default=4096, help="chunked cross-entropy tokens")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lr-warmup-steps", type=int, default=20)
    ap.add_argument("--loss-rtol", type=float, default=None,
                    help="largest relative loss difference of one step (default 0.02 bf16, 1e-5 fp32)")
    ap.add_argument("--loss-mean-rtol", type=float, default=None,
                    help="largest mean relative loss difference (default 0.005 bf16, 1e-6 fp32)")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds one run may take")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    # `timeout` (the GPU scripts) ends this process with SIGTERM: end the ranks too (launch's finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import torch

    from common import device_name, emit

    from carpool.training.config import ModelShapeConfig, llama_hf_config
    from carpool.training.metrics import ModelShape
    from carpool.training.pretokenize import write_token_file

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = args.nproc_per_node
    if n < 2:
        raise SystemExit(f"--nproc-per-node: must be >= 2 (the scaled run), got {n}")
    if device == "cuda" and torch.cuda.device_count() < n:
        raise SystemExit(f"--nproc-per-node: {n} GPUs asked for, {torch.cuda.device_count()} visible")
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps: must exceed --warmup ({args.warmup}), got {args.steps}")
    seq_len = args.seq_len or (64 if args.tiny else 4096)
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    bf16 = precision == "bf16"
    rtol = args.loss_rtol if args.loss_rtol is not None else (0.02 if bf16 else 1e-5)
    mean_rtol = args.loss_mean_rtol if args.loss_mean_rtol is not None else (0.005 if bf16 else 1e-6)
    shape = TINY if args.tiny else LLAMA_1B
    model = {k: v for k, v in shape.items() if k != "vocab_size"}
    hf = llama_hf_config(ModelShapeConfig(**model), shape["vocab_size"], 0, 1)
    flops_per_token = ModelShape.from_hf_config(hf).flops_per_token(seq_len)
    b = args.micro_batch_size
    total_steps = args.steps + args.profile_steps
    tokens_per_step = n * b * seq_len

    result: dict[str, Any] = {
        "benchmark": "train_scaling",
        "device": device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "shape": shape, "seq_len": seq_len, "precision": precision,
        "parallelism": "fsdp2 (fully_shard per decoder layer and root, reshard_after_forward, "
                       + ("FSDP2's own prefetch)" if args.no_explicit_prefetch else "explicit prefetch)"),
        "explicit_prefetch": not args.no_explicit_prefetch,
        "activation_checkpointing": args.activation_checkpointing, "nproc_per_node": n, "micro_batch_size": b,
        "steps": args.steps, "warmup": args.warmup, "flops_per_token": flops_per_token,
        "comparison": (f"one: 1 rank, micro-batch {b}, gradient accumulation {n}; many: {n} ranks, micro-batch "
                       f"{b} each, no accumulation; the same {n * b} sequences at every optimizer step"),
        "data": "fixed random 16-token phrases drawn with Zipf-like frequencies (seed 0)",
    }
    with tempfile.TemporaryDirectory() as workdir:
        prefix = os.path.join(workdir, "tokens")
        write_token_file(phrase_tokens((total_steps + 1) * n * b * (seq_len + 1), shape["vocab_size"]), prefix,
                         shape["vocab_size"], 0, 1, 2)

        def spec(world: int, trace: str | None, measure: bool) -> dict[str, Any]:
            config = {
                "data": {"train": prefix}, "model": dict(shape), "seq_len": seq_len, "micro_batch_size": b,
                "grad_accum_steps": n // world, "max_steps": total_steps, "precision": precision,
                "activation_checkpointing": args.activation_checkpointing, "device": device,
                "loss_chunk_size": args.loss_chunk_size,
                "parallel": {"strategy": "fsdp", "explicit_prefetch": not args.no_explicit_prefetch},
                "optim": {"lr": args.lr, "warmup_steps": args.lr_warmup_steps},
                "output_dir": os.path.join(workdir, f"out{world}"), "checkpoint": {"resume": False},
                "export": False, "progress_bar": False}
            return {"config": config, "steps": args.steps, "warmup": args.warmup, "measure_matmul": measure,
                    "profile_steps": args.profile_steps if trace else 0, "trace": trace,
                    # CPU: the ranks share the cores
                    "threads_per_rank": max(1, (os.cpu_count() or 1) // world) if device == "cpu" else 0}

        trace = os.path.abspath(args.trace) if args.trace else os.path.join(workdir, "trace_rank0.json.gz")
        one = launch(1, spec(1, None, True), workdir, "one", args.run_timeout)
        many = launch(n, spec(n, trace, False), workdir, "many", args.run_timeout)
    matmul = one[0].get("matmul_flops_measured")
    result["matmul_flops_measured"] = matmul
    result["num_params"] = one[0]["num_params"]
    result["one"] = summarize_run(one, args.warmup, tokens_per_step, flops_per_token, matmul)
    result["many"] = summarize_run(many, args.warmup, tokens_per_step, flops_per_token, matmul)
    ratio = result["many"]["tokens_per_s"] / result["one"]["tokens_per_s"]
    result["tokens_per_s_ratio"] = ratio
    result["scaling_efficiency"] = ratio / n
    result["target_ratio"] = TARGET_EFFICIENCY * n
    result["meets_target"] = ratio >= TARGET_EFFICIENCY * n
    result["loss_curves"] = compare_losses(result["one"]["losses"], result["many"]["losses"], rtol, mean_rtol)
    profile = many[0].get("profile")
    if profile is not None and not args.trace:
        profile["trace"] = None  # (was in the deleted work directory)
    result["profile_rank0"] = profile
    result["overlap_fraction"] = profile["overlap_fraction"] if profile else None
    result["all_gather_overlap_fraction"] = profile["all_gather"]["overlap_fraction"] if profile else None
    schedule = (profile or {}).get("fsdp_schedule")
    result["prefetch_in_flight_fraction"] = {kind: schedule[kind]["fraction_in_flight"] for kind in
                                             ("forward", "backward", "reduce_scatter")} if schedule else None
    emit(result, args.out)


if __name__ == "__main__":
    main()
