"""Compile every Triton kernel of carpool.ops.triton for an H100/H200 (sm_90) on a machine with no GPU,
and report registers, spills, whether the loads are pipelined, and a census of each kernel's loops
(instructions, block barriers, shared-memory accesses and shuffles per iteration, from the SASS). Prints
one JSON object.

    python scripts/triton_compile_check.py [--dtype bfloat16]

The ops are called on CPU tensors with TRITON_INTERPRET unset; each launch is intercepted, its
arguments specialized as the real launcher would (16-byte alignment, divisibility by 16), compiled
with the bundled ptxas, and not run. Catches compile errors and register spills before a GPU run.
Uses Triton's private launch helpers (written against Triton 3.9, and run with 3.6 too); it is a
developer tool, not a test. Layouts differ between Triton versions: check a kernel with the GPU image's
Triton (a second venv with `pip install triton==<version>` beside the CPU torch) before trusting a census.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from carpool.utils import cdiv

TARGET = GPUTarget("cuda", 90, 32)
compiled: dict[str, dict] = {}


def _compile_instead_of_launch(self: JITFunction, grid: object):
    def launch(*args, **kwargs):
        backend = make_backend(TARGET)
        binder = create_function_from_signature(self.signature, self.params, backend)
        kwargs["debug"] = False
        bound, specialization, options = binder(*args, **kwargs)
        options, sig, consts, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        named = {self.arg_names[path[0]]: str(v) for path, v in consts.items()}
        key = f"{self.fn.__name__} {sorted(named.items())} {sig} w{options.num_warps} s{options.num_stages}"
        if key in compiled:
            return
        kernel = triton.compile(ASTSource(self, sig, consts, attrs), target=TARGET, options=options.__dict__)
        compiled[key] = dict(kernel=self.fn.__name__, constexprs=named, num_warps=options.num_warps,
                             num_stages=options.num_stages, shared_bytes=kernel.metadata.shared,
                             **_resource_usage(kernel.asm["cubin"]), cp_async="cp.async" in kernel.asm["ptx"],
                             wgmma="wgmma" in kernel.asm["ptx"], pdl="griddepcontrol.wait" in kernel.asm["ptx"],
                             loops=loop_census(kernel.asm["cubin"]))
    return launch


_SASS_OP = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)[^;]*?(?:0x([0-9a-f]+))?\s*;", re.M)
_EXCHANGE_OPS = ("BAR", "STS", "STSM", "LDS", "LDSM", "SHFL")


def loop_census(cubin: bytes) -> list[dict]:
    """Per loop of the kernel's SASS (a backward branch and the code it jumps back over): instructions
    per iteration, and how many of them are block barriers, shared-memory accesses or shuffles. A
    memory-bound GEMV's loop should have none of the latter: they mean the compiler moves values between
    threads every iteration."""
    ops = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_OP.finditer(_cuobjdump(cubin, "-sass"))]
    loops = []
    for address, op, target in ops:
        if op == "BRA" and target is not None and int(target, 16) < address:
            body = [o for a, o, _ in ops if int(target, 16) <= a <= address]
            loops.append(dict(instructions=len(body),
                              **{name.lower(): sum(o == name for o in body) for name in _EXCHANGE_OPS}))
    return loops


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """The output of Triton's bundled cuobjdump with `flag` on a compiled kernel."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    text = _cuobjdump(cubin, "--dump-resource-usage")
    fields = dict(part.split(":", 1) for line in text.splitlines() if "REG:" in line for part in line.split()
                  if ":" in part)
    return dict(registers=int(fields.get("REG", -1)), stack_bytes=int(fields.get("STACK", -1)))


def call_every_op(dtype: torch.dtype) -> None:
    from carpool.forward_batch import AttentionMetadata
    from carpool.ops import triton as tri

    for hq, hkv, d in ((16, 8, 128), (32, 8, 128), (8, 8, 64)):
        page, reqs = 16, [(100, 1), (2000, 1), (300, 50)]
        nb = [cdiv(s, page) for s, _ in reqs]
        table = torch.arange(sum(nb), dtype=torch.int32)
        tables = torch.zeros(len(reqs), max(nb), dtype=torch.int32)
        for i, (start, n) in enumerate(zip([0] + list(torch.tensor(nb).cumsum(0)[:-1]), nb)):
            tables[i, :n] = table[start:start + n]
        qsl = [0, 1, 2, 52]
        k_cache = torch.zeros(sum(nb), page, hkv, d, dtype=dtype)
        q, k = torch.zeros(52, hq, d, dtype=dtype), torch.zeros(52, hkv, d, dtype=dtype)
        for max_q, reqs_now in ((1, reqs[:2]), (50, reqs)):  # decode-only, then mixed
            n_reqs = len(reqs_now)
            seq_lens = [s for s, _ in reqs_now]
            meta = AttentionMetadata(torch.tensor(qsl[:n_reqs + 1], dtype=torch.int32),
                                     torch.tensor(seq_lens, dtype=torch.int32), tables[:n_reqs].contiguous(),
                                     torch.zeros(qsl[n_reqs], dtype=torch.int64), max_query_len=max_q,
                                     max_seq_len=2000, query_start_loc_cpu=qsl[:n_reqs + 1], seq_lens_cpu=seq_lens)
            for splits in (1, 8):
                meta.extra = {"num_splits": splits}
                n = qsl[n_reqs]
                tri.paged_attention(q[:n], k[:n], k[:n], k_cache, k_cache.clone(), meta, d ** -0.5)
        tri.rms_norm(q, torch.zeros(d, dtype=dtype), 1e-6)
        tri.rope_and_store_kv(torch.arange(52), q, k, k, torch.zeros(4096, d), k_cache, k_cache.clone(),
                              torch.arange(52))
        tri.rope_and_store_kv(torch.arange(52), q, k, k, torch.zeros(4096, d), k_cache, k_cache.clone(),
                              torch.arange(52), torch.ones(d, dtype=dtype), torch.ones(d, dtype=dtype), 1e-6)
    if dtype != torch.float32:  # decode over an FP8 (e4m3) cache at Qwen3-0.6B's heads, one split
        hq, hkv, d, page, seq = 16, 8, 128, 16, 2000
        fp8_cache = torch.zeros(cdiv(seq, page), page, hkv, d, dtype=torch.float8_e4m3fn)
        meta = AttentionMetadata(torch.arange(5, dtype=torch.int32), torch.full((4,), seq, dtype=torch.int32),
                                 torch.zeros(4, cdiv(seq, page), dtype=torch.int32), torch.zeros(4, dtype=torch.int64),
                                 max_query_len=1, max_seq_len=seq, query_start_loc_cpu=list(range(5)),
                                 seq_lens_cpu=[seq] * 4)
        meta.extra = {"num_splits": 1}
        tri.paged_attention(torch.zeros(4, hq, d, dtype=dtype), None, None, fp8_cache, fp8_cache.clone(), meta,
                            d ** -0.5, 0.5, 0.5)
    for hidden in (1024, 4096):
        x = torch.zeros(8, hidden, dtype=dtype)
        w = torch.zeros(hidden, dtype=dtype)
        tri.rms_norm(x, w, 1e-6)
        tri.fused_add_rms_norm(x, x, w, 1e-6)
        tri.silu_and_mul(torch.zeros(8, 2 * 3 * hidden, dtype=dtype))
        if dtype != torch.float32:  # FP8 activations for a W8A8 GEMM: per token, per 128 columns, static
            from carpool.ops.triton.quant_gemm import quantize_fp8_act

            gate_up = torch.zeros(64, 2 * 7 * hidden // 2, dtype=dtype)  # (Llama-3-8B: 14,336 at 4,096)
            for group, static in ((None, None), (128, None), (None, torch.ones(1))):
                tri.rms_norm_fp8(x, x, w, 1e-6, group, static, 16)
                tri.silu_and_mul_fp8(gate_up, group, static, 64)
                quantize_fp8_act(x, group, static)
        for n, k in ((3 * hidden, hidden), (hidden, 4 * hidden)):  # batch-1 projections, short and long rows
            tri.gemv(torch.zeros(1, k, dtype=dtype), torch.zeros(n, k, dtype=dtype))
        tri.gemv_silu_and_mul(torch.zeros(1, hidden, dtype=dtype), torch.zeros(2 * 3 * hidden, hidden, dtype=dtype))
        heads = hidden // 128  # the fused q/k/v GEMV with RoPE and the KV store (GQA 4)
        kv_cache = torch.zeros(16, 16, heads // 4, 128, dtype=dtype)
        tri.gemv_rope_and_store_kv(torch.zeros(1, hidden, dtype=dtype),
                                   torch.zeros(3 * hidden // 2, hidden, dtype=dtype), None,
                                   torch.zeros(1, dtype=torch.long), torch.zeros(4096, 128), kv_cache,
                                   kv_cache.clone(), torch.zeros(1, dtype=torch.long), heads, heads // 4)
    tri.sample_from_logits(torch.zeros(4, 151936, dtype=dtype), torch.ones(4), torch.zeros(4, dtype=torch.int64))
    from carpool.ops.torch_ref.moe import TopKRouting

    e, h, i = 128, 2048, 768  # Qwen3-30B-A3B's experts (never touched: empty, not zeroed)
    w13, w2 = torch.empty(e, 2 * i, h, dtype=dtype), torch.empty(e, h, i, dtype=dtype)
    for t in (1, 8):  # routed in the gate/up GEMV; the routing kernel, then the grouped GEMMs
        tri.fused_moe_routed(torch.zeros(t, h, dtype=dtype), torch.zeros(t, e, dtype=dtype), w13, w2,
                             TopKRouting(8, True, True))
    from carpool.ops.triton.host_io import copy_to_host, stage_inputs  # step boundaries through pinned memory

    copy_to_host(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    for fixup in (None, torch.zeros(8, dtype=torch.int32)):
        stage_inputs(torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64), fixup,
                     None if fixup is None else torch.zeros(8, dtype=torch.int64), torch.zeros(64, dtype=torch.int32),
                     torch.zeros(64, dtype=torch.int32), 16, 40, torch.zeros(8, 3, dtype=torch.int32),
                     torch.zeros(8, 10, dtype=torch.int32))
    from carpool.ops.triton.all_reduce_norm import MAX_PROGRAMS, all_reduce_add_rms_norm

    for hidden in (4096, 5120):  # rank 0 of 2
        x = torch.zeros(8, hidden, dtype=dtype)
        ptrs = torch.zeros(2, dtype=torch.int64)
        all_reduce_add_rms_norm(x, x, torch.zeros(hidden, dtype=dtype), 1e-6, ptrs, ptrs,
                                torch.zeros(MAX_PROGRAMS, dtype=torch.int32), torch.zeros(8, dtype=torch.int32),
                                8 * hidden, 0, 2)
        if dtype != torch.float32:  # the batch-1 push exchange (16-bit outputs packed with a flag)
            from carpool.ops.triton.all_reduce_norm import embedding_push, pushed_add_rms_norm, pushed_gather
            from carpool.ops.triton.gemv import gemv_push

            slots = torch.zeros(2 * 2 * 8192, dtype=torch.int64)
            epoch = torch.zeros(1, dtype=torch.int32)
            gemv_push(torch.zeros(1, hidden // 2, dtype=dtype), torch.zeros(hidden, hidden // 2, dtype=dtype),
                      ptrs, epoch, 8192, 0, 2)
            pushed_add_rms_norm(x[:1], torch.zeros(hidden, dtype=dtype), 1e-6, slots, epoch, 8192, 2)
            embedding_push(torch.zeros(1, dtype=torch.long), torch.zeros(64, hidden, dtype=dtype), 0, ptrs, epoch,
                           8192, 0, 2)
            pushed_gather(torch.zeros(2 * 2 * 32064, dtype=torch.int64), epoch, 32064, 2, 64128, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--no-pdl", action="store_true", help="compile the kernels as launched without PDL")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this script compiles the kernels")
    JITFunction.__getitem__ = _compile_instead_of_launch  # type: ignore[method-assign]
    from carpool.ops.triton import utils

    utils.set_pdl(not args.no_pdl)  # as the model runner sets it on an H100/H200
    call_every_op(getattr(torch, args.dtype))
    rows = list(compiled.values())
    print(json.dumps(dict(target="sm_90", triton=triton.__version__, dtype=args.dtype,
                          spilling=[r for r in rows if r["stack_bytes"] > 0], kernels=rows), indent=1))


if __name__ == "__main__":
    main()
