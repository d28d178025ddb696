"""One decode-attention launch over mixed context lengths, for Nsight Compute:

    ncu --kernel-name _decode_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section WarpStateStats python3 scripts/ncu_decode_mixed.py --batch 64

Why: at batch 64-128 with contexts of 100-1100 tokens the kernel reads KV at only 0.68-0.78 of copy
bandwidth (benchmarks/bench_kernels.py --parts mixed), against 0.93 with uniform 1k contexts; the
stall reasons say whether the programs are latency-bound (dependent page-table and K/V loads) or short
of work."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_kernels import HEAD_DIM, decode_inputs  # noqa: E402

from carpool.ops.triton.decode_attention import DecodeConfig, decode_attention, decode_scratch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--splits", type=int, default=1)
    args = ap.parse_args()
    lens = torch.randint(100, 1101, (args.batch,), generator=torch.Generator().manual_seed(1)).tolist()
    inp = decode_inputs(args.batch, lens, 1, torch.Generator().manual_seed(0))
    scratch = decode_scratch(args.batch, inp["q"].shape[1], args.splits, HEAD_DIM, "cuda")
    for _ in range(5):
        decode_attention(inp["q"], inp["k_cache"], inp["v_cache"], inp["out"], inp["tables"][0], inp["seq_lens"],
                         inp["qsl"], HEAD_DIM ** -0.5, args.splits, DecodeConfig(), scratch)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
