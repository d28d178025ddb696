"""Kernel choices undone for ablations (bench_latency's --gemv-block-* and --decode-splits).

At TP=1 the engine runs in the benchmark's process and `apply_ablations` patches it there. Under tensor
parallelism the ranks are processes of their own: `export_to_workers` puts the values in the environment
they inherit, and `tp_ablations/sitecustomize.py` (first on their PYTHONPATH) applies them as each rank's
interpreter starts, before carpool is imported. The engine itself knows nothing of this.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

ENV = "CARPOOL_BENCH_ABLATIONS"


def parse_gemv_override(text: str) -> list[int]:
    """"K=block_n,block_k,num_warps,num_stages" -> [K, block_n, block_k, num_warps, num_stages]."""
    k, _, rest = text.partition("=")
    values = [int(k)] + [int(v) for v in rest.split(",")]
    if len(values) != 5:
        raise ValueError(f"--gemv-override wants K=block_n,block_k,num_warps,num_stages, got {text!r}")
    return values


def apply_ablations(gemv_block_k: int | None, gemv_block_k_long: int | None, gemv_block_n: int | None,
                    decode_splits: int | None, gemv_overrides: list[list[int]] | None = None) -> None:
    """Patch this process: GEMV columns per step (rows of at most 8192 / longer), rows per program, the
    decode split count of the smallest batches (the split table's first row), and whole GEMV configs
    for rows of one length K (parse_gemv_override; the push and SiLU variants keep two rows each)."""
    overrides = {o[0]: o[1:] for o in gemv_overrides or []}
    if gemv_block_k or gemv_block_k_long or gemv_block_n or overrides:
        gemv_module = importlib.import_module("carpool.ops.triton.gemv")  # (tri.gemv is the function)
        default = gemv_module.default_gemv_config

        def patched(k: int, push: bool = False):  # type: ignore[no-untyped-def]
            if k in overrides:
                bn, bk, warps, stages = overrides[k]
                return gemv_module.GemvConfig(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            config = default(k, push)
            block_k = gemv_block_k if k <= 8192 else gemv_block_k_long
            config = dataclasses.replace(config, block_k=block_k) if block_k else config
            return dataclasses.replace(config, block_n=gemv_block_n) if gemv_block_n else config
        gemv_module.default_gemv_config = patched  # type: ignore[attr-defined]
    if decode_splits:
        attention = importlib.import_module("carpool.ops.triton.attention")
        attention.DECODE_SPLIT_TABLE = ((attention.DECODE_SPLIT_TABLE[0][0], decode_splits),
                                        *attention.DECODE_SPLIT_TABLE[1:])


def export_to_workers(*ablations: object) -> None:
    """apply_ablations' arguments, for tensor-parallel ranks started after this call (they inherit the
    environment)."""
    os.environ[ENV] = json.dumps(list(ablations))
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_ablations")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
