"""Compile the quantization kernels (ops/triton/quant_*.py, fp8.py, the attention kernels over an FP8 KV
cache) for an H100/H200 (sm_90) on a machine
with no GPU, with scripts/triton_compile_check.py's interception of each launch, on the Llama-3-8B
shapes, and the fused MoE on FP8 experts (block and channel scales) and 4-bit experts (group 128, with and
without zeros) at the Qwen3-30B-A3B expert shape; report registers and spills. Prints one JSON object.

    python scripts/quant_compile_check.py
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from triton_compile_check import _compile_instead_of_launch, compiled  # noqa: E402


def call_quant_ops() -> None:
    from carpool.forward_batch import AttentionMetadata, TritonAttentionMetadata
    from carpool.ops import triton as tri
    from carpool.ops.triton import quant_gemm, quant_gemv

    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    for n, k in ((6144, 4096), (28672, 4096), (4096, 14336)):
        w = torch.zeros(n, k, dtype=fp8)
        channel, block = torch.ones(n), torch.ones(triton.cdiv(n, 128), triton.cdiv(k, 128))
        packed = torch.zeros(n, k // 8, dtype=torch.int32)
        scales, zeros = torch.zeros(n, k // 128, dtype=bf16), torch.zeros(n, k // 128, dtype=bf16)
        for m in (1, 4, 8):
            x = torch.zeros(m, k, dtype=bf16)
            quant_gemv.fp8_gemv(x, w, channel)
            quant_gemv.fp8_gemv(x, w, block)
            quant_gemv.int4_gemv(x, packed, scales, zeros, 128)
            quant_gemv.int4_gemv(x, packed, scales, None, 128)
            if n == 28672:  # the merged gate/up projection: the GEMV with SiLU-and-mul
                quant_gemv.fp8_gemv_silu_and_mul(x, w, channel)
                quant_gemv.fp8_gemv_silu_and_mul(x, w, block)
                quant_gemv.int4_gemv_silu_and_mul(x, packed, scales, zeros, 128)
        for m in (64, 8192):
            x = torch.zeros(m, k, dtype=bf16)
            xq, xs = quant_gemm.quantize_fp8_act(x)
            quant_gemm.fp8_gemm(xq, xs, w, channel, bf16)
            xq, xs = quant_gemm.quantize_fp8_act(x, 128)
            quant_gemm.fp8_gemm(xq, xs, w, block, bf16)
            xq, xs = quant_gemm.quantize_fp8_act(x, static_scale=torch.ones(1))
            quant_gemm.fp8_gemm(xq, xs, w, channel, bf16)
            quant_gemm.int4_gemm(x, packed, scales, zeros, 128)
        for m in (16, 32, 256):  # the int4 GEMM's swap_ab / split-K tiles and its 128-row tiles
            quant_gemm.int4_gemm(torch.zeros(m, k, dtype=bf16), packed, scales, zeros, 128)
            quant_gemm.int4_gemm(torch.zeros(m, k, dtype=bf16), packed, scales, None, 128)
        quant_gemm.dequantize_int4(packed, scales, zeros, 128, bf16)  # (int4_dequant_mm's first half)
    hq, hkv, d, page = 32, 8, 128, 16
    reqs = [(100, 1), (2000, 1), (300, 50)]
    nb = [triton.cdiv(s, page) for s, _ in reqs]
    tables = torch.zeros(len(reqs), max(nb), dtype=torch.int32)
    k_cache, v_cache = (torch.zeros(sum(nb), page, hkv, d, dtype=fp8) for _ in range(2))
    q, kv = torch.zeros(52, hq, d, dtype=bf16), torch.zeros(52, hkv, d, dtype=bf16)
    qsl = [0, 1, 2, 52]
    tri.rope_and_store_kv(torch.arange(52), q, kv, kv, torch.zeros(4096, d), k_cache, v_cache, torch.arange(52),
                          k_scale=0.5, v_scale=0.5)
    tri.rope_and_store_kv(torch.arange(52), q, kv, kv, torch.zeros(4096, d), k_cache, v_cache, torch.arange(52),
                          torch.ones(d, dtype=bf16), torch.ones(d, dtype=bf16), 1e-6, k_scale=0.5, v_scale=0.5)
    for max_q, n_reqs in ((1, 2), (50, 3)):
        seq_lens = [s for s, _ in reqs[:n_reqs]]
        for splits, cascade in ((1, False), (8, False), (8, True)):
            meta = TritonAttentionMetadata(
                torch.tensor(qsl[:n_reqs + 1], dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                tables[:n_reqs].contiguous(), torch.zeros(qsl[n_reqs], dtype=torch.int64), max_query_len=max_q,
                max_seq_len=2000, query_start_loc_cpu=qsl[:n_reqs + 1], seq_lens_cpu=seq_lens, num_splits=splits,
                cascade_prefix_len=torch.zeros(1, dtype=torch.int32) if cascade else None)
            nt = qsl[n_reqs]
            tri.paged_attention(q[:nt], kv[:nt], kv[:nt], k_cache, v_cache, meta, d ** -0.5, 0.5, 2.0)
    assert isinstance(meta, AttentionMetadata)


def call_quantized_moe_ops() -> None:
    from carpool.ops.torch_ref.moe import ExpertScales, Int4ExpertScales
    from carpool.ops.triton import moe

    e, h, i, k, g = 128, 2048, 768, 8, 128
    w13, w2 = torch.zeros(e, 2 * i, h, dtype=torch.float8_e4m3fn), torch.zeros(e, h, i, dtype=torch.float8_e4m3fn)
    p13, p2 = torch.zeros(e, 2 * i, h // 8, dtype=torch.int32), torch.zeros(e, h, i // 8, dtype=torch.int32)
    s13, s2 = torch.zeros(e, 2 * i, h // g, dtype=torch.bfloat16), torch.zeros(e, h, i // g, dtype=torch.bfloat16)
    bh, bi = triton.cdiv(h, 128), triton.cdiv(i, 128)
    for weights, scales in (((w13, w2), ExpertScales(torch.ones(e, 2 * bi, bh), torch.ones(e, bh, bi), True)),
                            ((w13, w2), ExpertScales(torch.ones(e, 2 * i), torch.ones(e, h), False)),
                            ((p13, p2), Int4ExpertScales(s13, s2, s13.clone(), s2.clone())),
                            ((p13, p2), Int4ExpertScales(s13, s2))):
        for t in (1, 4, 64, 512, 4096):  # the GEMV path, then each grouped-GEMM tile of default_gemm_config
            x = torch.zeros(t, h, dtype=torch.bfloat16)
            moe.fused_moe(x, *weights, torch.zeros(t, k, dtype=torch.bfloat16), torch.zeros(t, k, dtype=torch.int64),
                          scales=scales)


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this script compiles the kernels")
    JITFunction.__getitem__ = _compile_instead_of_launch  # type: ignore[method-assign]
    from carpool.ops.triton import utils

    utils.set_pdl(True)
    call_quant_ops()
    call_quantized_moe_ops()
    rows = list(compiled.values())
    print(json.dumps(dict(target="sm_90", triton=triton.__version__,
                          spilling=[r for r in rows if r["stack_bytes"] > 0], kernels=rows), indent=1))


if __name__ == "__main__":
    main()
