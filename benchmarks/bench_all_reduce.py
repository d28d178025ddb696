"""All-reduce on the GPUs of one host: carpool's one-shot symmetric-memory path (CustomAllReduce)
against NCCL, for correctness and for latency.

`--check`: every rank compares the fast path with NCCL, bit for bit at 2 ranks (a + b rounds the same
in either order), in eager mode and inside a captured CUDA graph replayed on fresh inputs, for
bfloat16 and float32 at decode-like sizes; TPGroup must send what the fast path cannot take (float16,
odd sizes, too large) to NCCL and still be right. When the fast path is unavailable the reason is
reported and only the NCCL fallback is checked.

Timing: per size, a CUDA graph of 64 back-to-back all-reduces (one decode step has 2 per layer) is
replayed; the time per all-reduce is reported for NCCL and for the fast path.

Launch: `python benchmarks/bench_all_reduce.py [--check] [-n 2] --out r.json` starts one process per
GPU (this script again, with --rank); rank 0 prints one JSON object and writes it to --out.
NVLink multicast stays off in every process (carpool.custom_all_reduce.MULTICAST_OFF).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from carpool.distributed.symmetric import MULTICAST_OFF, disable_multicast  # noqa: E402

SIZES_BYTES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 2 << 20, 4 << 20, 8 << 20, 16 << 20]
CHAIN = 64


def launch(args: argparse.Namespace) -> int:
    from carpool.worker.tp_processes import free_port

    env = dict(os.environ, **MULTICAST_OFF, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(args.n), PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank", str(r), *sys.argv[1:]],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(args.n)]
    deadline = time.monotonic() + args.timeout
    codes: list[int | None] = [None] * args.n
    while any(c is None for c in codes):
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
            for p in procs:  # one rank failed or all hang: stop the others (they may wait in a collective)
                if p.poll() is None:
                    p.kill()
            codes = [p.wait() for p in procs]
            break
        time.sleep(0.1)
    return 0 if all(c == 0 for c in codes) else 1


def rank_main(args: argparse.Namespace) -> None:
    disable_multicast()
    import torch
    import torch.distributed as dist

    from common import emit  # the script's own folder is on sys.path

    from carpool.config import KernelConfig
    from carpool.distributed.startup import establish_custom_all_reduce

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    cpu_group = dist.new_group(backend="gloo")
    result: dict[str, Any] = {"benchmark": "all_reduce", "world_size": world, "device": torch.cuda.get_device_name(0),
                              "torch": torch.__version__, "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    customs = {}
    for dtype in (torch.bfloat16, torch.float32):
        customs[dtype] = establish_custom_all_reduce(device, dtype, rank, rank, world, world, cpu_group,
                                                     KernelConfig(), max_bytes=args.max_bytes)
    result["custom_available"] = {str(d): c is not None for d, c in customs.items()}
    if args.check:
        result["checks"] = run_checks(customs, rank, world, device)
    result["latency_us"] = run_timings(customs.get(torch.bfloat16), device)
    if rank == 0:
        emit(result, args.out)
    dist.barrier(cpu_group)
    dist.destroy_process_group()


def run_checks(customs: dict, rank: int, world: int, device: Any) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from carpool.distributed import TPGroup

    def nccl(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if world == 2:
            return torch.equal(a, b)
        return torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2)

    def data(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed * 100 + rank)
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    failures: list[str] = []
    counted: dict[str, int] = {}
    for dtype, custom in customs.items():
        group = TPGroup(rank, world, custom)
        shapes = [(1, 4096), (7, 4096), (256, 5120), (3, 5120)]
        for i, shape in enumerate(shapes):  # eager
            x = data(shape, dtype, i)
            if not same(group.all_reduce(x.clone()), nccl(x)):
                failures.append(f"eager {dtype} {shape}")
        if custom is not None:
            # captured: three chained all-reduces (as in consecutive layers), replayed on new inputs
            static = data((8, 4096), dtype, 10)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    group.all_reduce(group.all_reduce(static) * 0.5)
                calls = custom.calls  # the three captured calls must all take the fast path
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    a = group.all_reduce(static)
                    b = group.all_reduce(a * 0.5)
                    out = group.all_reduce(b + static)
            torch.cuda.current_stream().wait_stream(stream)
            counted[str(dtype)] = custom.calls - calls
            for trial in range(3):
                fresh = data((8, 4096), dtype, 20 + trial)
                static.copy_(fresh)
                graph.replay()
                ra = nccl(fresh)
                rb = nccl(ra * 0.5)
                want = nccl(rb + fresh)
                if not same(out, want):
                    failures.append(f"graph {dtype} replay {trial}")
        # what the fast path refuses still works: float16, an odd element count, a big message
        for shape, dt in (((5, 4096), torch.float16), ((1, 4095), dtype), ((4096, 4096), dtype)):
            x = data(shape, dt, 30)
            if custom is not None and custom.eligible(x):
                failures.append(f"{dt} {shape} should have gone to NCCL")
            if not same(group.all_reduce(x.clone()), nccl(x)):
                failures.append(f"fallback {dt} {shape}")
    torch.cuda.synchronize()
    return {"passed": not failures, "failures": failures, "fast_path_calls_in_graph_check": counted}


def run_timings(custom: Any, device: Any) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    rows = []
    for nbytes in SIZES_BYTES:
        x = torch.randn(nbytes // 2, device=device).to(torch.bfloat16)
        row: dict[str, Any] = {"bytes": nbytes}
        def nccl(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)  # in place: no extra kernel (the values overflow; only the time matters)
            return t

        paths = {"nccl": nccl}
        if custom is not None and custom.eligible(x):
            paths["custom"] = custom.all_reduce
        for name, fn in paths.items():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn(x.clone())
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    y = x
                    for _ in range(CHAIN):
                        y = fn(y)
            torch.cuda.current_stream().wait_stream(stream)
            graph.replay()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 10
            dist.barrier()
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            row[f"{name}_us"] = 1e3 * start.elapsed_time(end) / (reps * CHAIN)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with NCCL (eager and CUDA graph) too")
    ap.add_argument("-n", type=int, default=2, help="number of GPUs (default: 2)")
    ap.add_argument("--max-bytes", type=int, default=16 << 20, help="symmetric buffer size (fast path limit)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.rank is None:
        sys.exit(launch(args))
    rank_main(args)


if __name__ == "__main__":
    main()
