"""The FSDP2 scaling benchmark's CPU path (benchmarks/bench_train_scaling.py, gloo): its two runs, one
rank with gradient accumulation 2 and two ranks without, see the same tokens at every optimizer step, so
their loss curves agree to fp32 rounding; the JSON carries the throughput ratio, the loss comparison and
the rank-0 profile (on CPU, the schedule of FSDP's collectives); and the overlap of NCCL with compute
kernels is measured on a trace's timeline."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train_scaling.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_train_scaling import kernel_overlap  # noqa: E402

ALL_GATHER = "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
REDUCE_SCATTER = "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"


def kernel(name: str, start: float, end: float, stream: int = 7) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": end - start, "args": {"stream": stream}}


def test_overlap_counts_the_time_nccl_and_compute_kernels_run_at_once():
    events = [
        kernel("gemm", 0, 10),
        kernel(ALL_GATHER, 5, 15, stream=20),           # 5 of its 10 us under the gemm
        kernel(REDUCE_SCATTER, 20, 30, stream=24),      # 3 of its 10 us under the two kernels below
        kernel("silu", 25, 27), kernel("norm", 26, 28, stream=9),   # overlapping compute counts once
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 0, "dur": 40},   # not a kernel
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 40},
    ]
    got = kernel_overlap(events)
    assert got["nccl"]["us"] == 20 and got["compute_us"] == 13 and got["span_us"] == 30
    assert got["nccl"]["overlap_us"] == 5 + 3 and got["nccl"]["exposed_us"] == 20 - 8
    assert got["overlap_fraction"] == pytest.approx(8 / 20)
    assert got["all_gather"]["overlap_fraction"] == pytest.approx(5 / 10)
    assert got["reduce_scatter"]["overlap_fraction"] == pytest.approx(3 / 10)


def test_overlap_fraction_is_none_without_nccl_kernels():
    got = kernel_overlap([kernel("gemm", 0, 10), {"ph": "X", "cat": "cpu_op", "name": "gloo:all_gather", "ts": 0,
                                                  "dur": 5}])
    assert got["overlap_fraction"] is None and got["all_gather"]["overlap_fraction"] is None
    assert got["compute_us"] == 10


@pytest.fixture(scope="module")
def scaling(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("scaling")
    out, trace = tmp / "scaling.json", tmp / "trace.json.gz"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # lr 3e-3 without warm-up: the loss moves in 5 steps, so equal curves are not equal constants
    subprocess.run([sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--steps", "5", "--warmup", "2",
                    "--lr", "3e-3", "--lr-warmup-steps", "1", "--trace", str(trace), "--out", str(out)],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, timeout=300)
    return {"result": json.loads(out.read_text()), "trace": trace}


def test_two_rank_loss_curve_equals_the_one_rank_curve_with_accumulation(scaling):
    r = scaling["result"]
    one, many = r["one"]["losses"], r["many"]["losses"]
    assert len(one) == len(many) == 5
    assert one[-1] < one[0]
    assert many == pytest.approx(one, rel=1e-5)
    assert r["loss_curves"]["match"] is True


def test_scaling_json_reports_both_runs_their_ratio_and_the_overlap(scaling):
    r = scaling["result"]
    assert (r["one"]["world_size"], r["many"]["world_size"], r["nproc_per_node"]) == (1, 2, 2)
    assert r["one"]["tokens_per_step"] == r["many"]["tokens_per_step"] == 2 * r["micro_batch_size"] * r["seq_len"]
    assert r["tokens_per_s_ratio"] == pytest.approx(r["many"]["tokens_per_s"] / r["one"]["tokens_per_s"])
    assert r["target_ratio"] == pytest.approx(1.85)
    assert r["profile_rank0"]["steps"] == 2
    assert "overlap_fraction" in r and "all_gather_overlap_fraction" in r  # None on CPU: no NCCL kernels


def test_cpu_scaling_json_reports_the_forward_prefetch_schedule(scaling):
    r = scaling["result"]
    forward = r["profile_rank0"]["fsdp_schedule"]["forward"]
    assert len(forward["windows"]) == r["profile_rank0"]["steps"] * (r["shape"]["num_hidden_layers"] - 1)
    assert r["prefetch_in_flight_fraction"]["forward"] == forward["fraction_in_flight"] == 1.0
    assert forward["compute_between_us"] > 0


def test_rank0_trace_is_a_gzipped_chrome_trace(scaling):
    with gzip.open(scaling["trace"], "rt") as f:
        trace = json.load(f)
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])
