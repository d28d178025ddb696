"""What the copies between two decode steps cost, against kernels that read and write pinned host
memory directly. Why: in the batch-1 profiles (runs 58-61) the device idles 15-20 us per step around
the token's copy to the host and the next step's upload, mostly waiting on the copy engine after a graph
or a kernel, while the copies themselves take 1-2 us. A kernel can read and write pinned host memory
through unified addressing; this measures whether the boundary gets shorter that way before the engine
is changed. Prints one JSON object.

    python benchmarks/bench_step_boundary.py [--out FILE]

Each "step" replays a CUDA graph standing for the forward (a chain of small kernels, about 100 us), then
runs one boundary variant. The variant's cost is its time per step minus the graph's alone, back to
back; the host queues ahead, so host launch time does not count.
- copies: the engine's boundary today: the token to pinned memory (DtoH), the next inputs from pinned
  memory (HtoD), a device-to-device copy (block tables), an index_copy_ (the fix-up token).
- kernels: the engine's (ops/triton/host_io): `copy_to_host` writes the token to pinned memory, and
  `stage_inputs` reads the inputs from pinned memory and writes the device buffers, the fix-up included.
- side_stream: the engine's copies, with the token's DtoH and the upload on a second stream, so the
  forward's stream only waits for the upload (issued a step early) and for nothing of the DtoH.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, emit  # noqa: E402

from carpool.ops.triton.host_io import copy_to_host, stage_inputs  # noqa: E402

UPLOAD_WORDS = 256  # int32 words: a batch-1 step's inputs, padded (positions, slots, tables, ...)


def make_forward(num_kernels: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A graph of num_kernels small elementwise kernels (1 MB each); returns it and its 'token' (an int64
    it writes)."""
    a = torch.randint(0, 1000, (1 << 18,), dtype=torch.int32, device="cuda")
    b = torch.empty_like(a)
    token = torch.zeros(1, dtype=torch.int64, device="cuda")
    torch.add(a, 1, out=b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(num_kernels):
            torch.add(a, 1, out=b) if i % 2 == 0 else torch.add(b, 1, out=a)
        token.copy_(a[:1].to(torch.int64))
    return graph, token


def per_step_us(step: object, steps: int) -> float:
    for _ in range(20):
        step()  # type: ignore[operator]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()  # type: ignore[operator]
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--graph-kernels", type=int, default=48)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_step_boundary: needs a CUDA GPU (CUDA graphs, pinned memory)")
    graph, token = make_forward(args.graph_kernels)
    host_token = torch.zeros(1, dtype=torch.int64, pin_memory=True)
    host_inputs = torch.arange(UPLOAD_WORDS, dtype=torch.int32).pin_memory()
    staged = torch.zeros(UPLOAD_WORDS, dtype=torch.int32, device="cuda")
    static = torch.zeros(UPLOAD_WORDS, dtype=torch.int32, device="cuda")
    static_ids = torch.zeros(8, dtype=torch.int64, device="cuda")
    fixup_index = torch.zeros(1, dtype=torch.int64, device="cuda")
    # stage_inputs' host side: one input id, replaced by the token (the fix-up), and a row of block tables
    host_ids = torch.zeros(1, dtype=torch.int64).pin_memory()
    fixup_source = torch.zeros(1, dtype=torch.int32).pin_memory()
    host_tables = torch.arange(16, dtype=torch.int32).view(1, 16).pin_memory()
    tables = torch.zeros(8, 64, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    result: dict[str, object] = {"benchmark": "step_boundary", "device": device_name(),
                                 "graph_kernels": args.graph_kernels, "steps": args.steps}

    def graph_only() -> None:
        graph.replay()

    def copies() -> None:
        graph.replay()
        host_token.copy_(token, non_blocking=True)
        staged.copy_(host_inputs, non_blocking=True)
        static.copy_(staged)
        static_ids.index_copy_(0, fixup_index, token)

    def kernels() -> None:
        graph.replay()
        copy_to_host(token, host_token)
        stage_inputs(host_ids, static_ids[:1], fixup_source, token, host_inputs, static, 0, UPLOAD_WORDS,
                     host_tables, tables)

    def side_stream() -> None:
        side.wait_stream(torch.cuda.current_stream())  # (the upload a step early: here, at the same point)
        with torch.cuda.stream(side):
            staged.copy_(host_inputs, non_blocking=True)
        uploaded = torch.cuda.Event()
        uploaded.record(side)
        graph.replay()
        forward_done = torch.cuda.Event()
        forward_done.record()
        with torch.cuda.stream(side):
            side.wait_event(forward_done)
            host_token.copy_(token, non_blocking=True)
        torch.cuda.current_stream().wait_event(uploaded)
        static.copy_(staged)
        static_ids.index_copy_(0, fixup_index, token)

    try:  # does Triton take a pinned host tensor as a pointer?
        token.fill_(12345)
        copy_to_host(token, host_token)
        torch.cuda.synchronize()
        result["pinned_pointer_ok"] = int(host_token[0]) == 12345
    except Exception as e:  # noqa: BLE001 (reported, and the kernel variant skipped)
        result["pinned_pointer_ok"] = False
        result["pinned_pointer_error"] = f"{type(e).__name__}: {e}"
    variants = {"graph_only": graph_only, "copies": copies, "side_stream": side_stream}
    if result["pinned_pointer_ok"]:
        variants["kernels"] = kernels
    times = {name: per_step_us(fn, args.steps) for name, fn in variants.items()}
    times |= {f"{name}_again": per_step_us(fn, args.steps) for name, fn in variants.items()}
    result["us_per_step"] = {k: round(v, 2) for k, v in times.items()}
    base = min(times["graph_only"], times["graph_only_again"])
    result["boundary_us"] = {name: round(min(times[name], times[f"{name}_again"]) - base, 2)
                             for name in variants if name != "graph_only"}
    # the ratio: each variant's boundary against the engine's (copies)
    result["ratio_to_copies"] = {name: round(us / result["boundary_us"]["copies"], 3)  # type: ignore[index]
                                 for name, us in result["boundary_us"].items()}  # type: ignore[attr-defined]
    if "kernels" in variants:
        torch.cuda.synchronize()
        result["kernels_token_matches"] = int(host_token[0]) == int(token[0])
    emit(result, args.out)


if __name__ == "__main__":
    main()
