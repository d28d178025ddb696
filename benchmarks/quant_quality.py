"""Held-out perplexity of a trained checkpoint through the serving engine, unquantized and quantized (FP8
W8A8, an FP8 KV cache, INT4): the quality figure of the quantization issue. Prints one JSON object
(progress on stderr).

    python benchmarks/quant_quality.py --model DIR --data HELDOUT_PREFIX [--device cpu|cuda]
        [--sequences 32] [--seq-len 512] [--dtype auto] [--methods a,b,...] [--work-dir DIR]
        [--calibration TRAIN_PREFIX] [--training-eval] [--out FILE]

The tokens: the first N chunks of L + 1 tokens of the token file (`carpool pretokenize`), the chunks
`carpool eval --seq-len L --max-sequences N` scores (training/data.py's PackedSequences; only whole
chunks). Each chunk goes to the engine as one prompt with `SamplingParams(prompt_logprobs=0)`, which
returns the log-probability of every actual next prompt token; perplexity = exp(mean over the N * L
scored tokens of -logprob). The engine runs as users run it (`LLM`, paged KV cache, chunked prefill;
torch reference kernels on CPU, Triton on GPU), so the figure includes the quantized kernels and the FP8
KV cache's rounding; `--training-eval` adds the training-side model's perplexity on the same tokens
(`carpool eval`) as a cross-check of the unquantized figure.

Methods (`--methods`; by default all, int4_gptq only with `--calibration`; ratios are to `unquantized`,
the checkpoint in the engine's dtype with a KV cache of that dtype; `--dtype auto` is the checkpoint's
dtype on GPU and float32 on CPU):
- fp8_kv: unquantized weights, `--kv-cache-dtype fp8` (e4m3, per-layer scale 1.0: the checkpoint has none)
- fp8_online: `--quantization fp8` (per-channel weight scales computed while loading, dynamic per-token
  activations)
- fp8_checkpoint: a compressed-tensors FP8 checkpoint written from the model (per-channel, dynamic
  per-token activations; carpool.quantization.writers.write_fp8_channel)
- fp8_w8a8_fp8_kv: that checkpoint with the FP8 KV cache (issue target: ratio <= 1.01)
- int4_awq: AWQ GEMM packing, group 128, zero points (issue target: ratio <= 1.05), round to nearest
  (min-max per group, no calibration data), not AWQ's activation-aware scaling (which usually loses
  less).
- int4_gptq (only with `--calibration`, a token file other than --data, e.g. the train split): GPTQ's
  error compensation (quantization/gptq.py, non-sequential: every layer's Hessian from the float model)
  on `--calibration-sequences` chunks of L + 1 tokens, group 128, zero points, gptq_v2 packing.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

from carpool.training.pretokenize import open_tokens, paths_of  # noqa: E402


@dataclass(frozen=True)
class QualityMethod:
    """One engine configuration whose perplexity is measured."""
    name: str
    checkpoint: str  # "float" (the model itself) | "fp8" | "awq" | "gptq": a checkpoint written from it
    quantization: str | None = None  # the engine's --quantization
    kv_cache_dtype: str = "auto"  # the engine's --kv-cache-dtype


BASELINE = "unquantized"
BLOCK_SIZE = 16
METHODS: tuple[QualityMethod, ...] = (
    QualityMethod(BASELINE, "float"),
    QualityMethod("fp8_kv", "float", kv_cache_dtype="fp8"),
    QualityMethod("fp8_online", "float", quantization="fp8"),
    QualityMethod("fp8_checkpoint", "fp8"),
    QualityMethod("fp8_w8a8_fp8_kv", "fp8", kv_cache_dtype="fp8"),
    QualityMethod("int4_awq", "awq"),
    QualityMethod("int4_gptq", "gptq"),
)
CALIBRATED = {"gptq"}  # checkpoints that need calibration data
# The quality targets: perplexity / unquantized perplexity at most this.
TARGETS = {"fp8_w8a8_fp8_kv": 1.01, "int4_awq": 1.05}
CHECKPOINT_NOTES = {
    "fp8": "compressed-tensors float-quantized: e4m3 weights, per-channel scales max|row|/448, dynamic "
           "per-token activations",
    "awq": "AWQ GEMM packing, group 128, zero points; round-to-nearest min-max per group (no calibration)",
    "gptq": "GPTQ (error compensation, 1% damping, no act-order, Hessians from the float model), group 128, "
            "zero points, gptq_v2 packing",
}


def describe_device(device: str) -> str:
    if device == "cpu":
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return torch.cuda.get_device_name(torch.device(device))


def check_data_matches_model(model: str, data: str) -> None:
    """Raise ValueError when the token file at `data` was not made with `model`'s tokenizer (by the
    header's tokenizer hash, when it has one) or holds ids past the model's vocabulary."""
    import json

    from carpool.training.pretokenize import read_meta, tokenizer_sha256

    meta = read_meta(data)
    with open(os.path.join(model, "config.json")) as f:
        vocab_size = int(json.load(f)["vocab_size"])
    if meta.vocab_size > vocab_size:
        raise ValueError(f"data: tokenized with a vocabulary of {meta.vocab_size}, larger than the model's "
                         f"{vocab_size}")
    if meta.tokenizer_sha256 and os.path.isfile(os.path.join(model, "tokenizer.json")) \
            and meta.tokenizer_sha256 != tokenizer_sha256(model):
        raise ValueError(f"data: {data} was tokenized with another tokenizer than {model}'s (tokenizer.json "
                         "sha256 differs)")


def token_chunks(data: str, num_sequences: int, seq_len: int, field: str = "sequences") -> list[list[int]]:
    """The first `num_sequences` whole chunks of `seq_len + 1` tokens of the token file at `data`: the
    inputs and labels of the chunks `carpool eval` scores first (PackedSequences.chunk). `field`: the
    option that asked for num_sequences (errors start with it)."""
    if num_sequences < 1:
        raise ValueError(f"{field}: must be >= 1, got {num_sequences}")
    if seq_len < 1:
        raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
    tokens, _ = open_tokens(data)
    whole = len(tokens) // (seq_len + 1)
    if whole < num_sequences:
        raise ValueError(f"{field}: {data} holds {whole} whole chunks of {seq_len + 1} tokens, "
                         f"{num_sequences} asked")
    chunks = np.asarray(tokens[:num_sequences * (seq_len + 1)], dtype=np.int64).reshape(num_sequences, seq_len + 1)
    return chunks.tolist()


def engine_perplexity(llm: Any, sequences: Sequence[list[int]]) -> dict[str, float]:
    """Perplexity of every token of each sequence after its first, from the engine's prompt logprobs."""
    from carpool import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": list(s)} for s in sequences], params, use_tqdm=False)
    nll, count = 0.0, 0
    for seq, out in zip(sequences, outs):
        scored = out.prompt_logprobs
        assert scored is not None and len(scored) == len(seq), "one prompt logprob entry per prompt token"
        for token, entry in zip(seq[1:], scored[1:]):
            nll -= entry[token].logprob
            count += 1
    loss = nll / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def write_checkpoints(model: str, kinds: set[str], work_dir: str, group_size: int = 128,
                      calibration: Sequence[list[int]] | None = None, device: str = "cpu") -> dict[str, str]:
    """The checkpoints `kinds` ("fp8", "awq", "gptq") written from `model` under `work_dir`; "float" is
    `model` itself. "gptq" calibrates on the `calibration` sequences (its Hessians computed on `device`)."""
    from carpool.quantization.writers import write_fp8_channel, write_int4

    paths = {"float": model}
    for kind in sorted(kinds - {"float"}):
        dst = os.path.join(work_dir, kind)
        if kind == "fp8":
            paths[kind] = write_fp8_channel(model, dst)
        elif kind == "awq":
            paths[kind] = write_int4(model, dst, "awq", group_size)
        elif kind == "gptq":
            from carpool.quantization.gptq import collect_hessians

            if not calibration:
                raise ValueError("calibration: the gptq checkpoint needs calibration sequences")
            hessians = collect_hessians(model, calibration, device)
            paths[kind] = write_int4(model, dst, "gptq-v2-asym", group_size, hessians)
            del hessians
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            raise ValueError(f"checkpoint: unknown kind {kind!r}")
    return paths


def measure(method: QualityMethod, path: str, sequences: Sequence[list[int]], engine_kwargs: dict[str, Any]
            ) -> dict[str, Any]:
    """One method's perplexity through a fresh engine (released before returning)."""
    from carpool import LLM
    from carpool.quantization.config import describe_quantization

    start = time.perf_counter()
    llm = LLM(path, quantization=method.quantization, kv_cache_dtype=method.kv_cache_dtype, **engine_kwargs)
    cfg = llm.engine.config
    described = describe_quantization(cfg.model.hf_config, cfg.quantization, method.kv_cache_dtype, cfg.model.dtype)
    try:
        result = engine_perplexity(llm, sequences)
    finally:
        llm.engine.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {**result, **described, "dtype": str(cfg.model.dtype).removeprefix("torch."),
            "seconds": round(time.perf_counter() - start, 2)}


def run_quality(model: str, data: str, device: str, num_sequences: int, seq_len: int, dtype: str = "auto",
                methods: Sequence[str] | None = None, work_dir: str | None = None, group_size: int = 128,
                training_eval: bool = False, calibration: str | None = None,
                calibration_sequences: int = 64) -> dict[str, Any]:
    """The benchmark's JSON object (see the module docstring)."""
    by_name = {m.name: m for m in METHODS}
    names = list(methods) if methods else [m.name for m in METHODS
                                           if calibration is not None or m.checkpoint not in CALIBRATED]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"methods: unknown {', '.join(unknown)}; choose from {', '.join(by_name)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)  # every ratio needs it
    chosen = [by_name[n] for n in names]
    calibrated = [m.name for m in chosen if m.checkpoint in CALIBRATED]
    if calibrated and calibration is None:
        raise ValueError(f"calibration: {', '.join(calibrated)} need(s) a calibration token file (the train split)")
    if calibration is not None and os.path.realpath(paths_of(calibration)[0]) == os.path.realpath(paths_of(data)[0]):
        raise ValueError("calibration: the held-out file itself; calibrate on other tokens (the train split)")
    for tokens in (data, calibration) if calibration is not None else (data,):
        check_data_matches_model(model, tokens)
    sequences = token_chunks(data, num_sequences, seq_len)
    calib = (token_chunks(calibration, calibration_sequences, seq_len, "calibration_sequences")
             if calibrated and calibration else None)
    # Every sequence is one prompt of L + 1 tokens and one sampled token; the KV cache holds them all at
    # once (the capacity changes no value, and a CPU engine allocates its default budget slowly).
    engine_kwargs = {"device": device, "dtype": dtype, "enforce_eager": True, "max_model_len": seq_len + 2,
                     "num_kv_blocks": num_sequences * -(-(seq_len + 2) // BLOCK_SIZE), "block_size": BLOCK_SIZE}
    tmp = work_dir or tempfile.mkdtemp(prefix="carpool-quant-quality-")
    try:
        paths = write_checkpoints(model, {m.checkpoint for m in chosen}, tmp, group_size, calib, device)
        results: dict[str, dict[str, Any]] = {}
        for m in chosen:
            print(f"[quant_quality] {m.name}", file=sys.stderr, flush=True)
            results[m.name] = measure(m, paths[m.checkpoint], sequences, engine_kwargs)
    finally:
        if work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    base = results[BASELINE]["perplexity"]
    for r in results.values():
        r["ratio"] = r["perplexity"] / base
    out: dict[str, Any] = {
        "benchmark": "quant/quality-heldout-perplexity", "device": describe_device(device),
        "kernel_backend": "torch" if device == "cpu" else "triton", "model": os.path.abspath(model),
        "data": os.path.abspath(data), "sequences": num_sequences, "seq_len": seq_len,
        "scored_tokens": results[BASELINE]["tokens"], "baseline": BASELINE,
        "checkpoints": {k: CHECKPOINT_NOTES[k] for k in sorted({m.checkpoint for m in chosen} - {"float"})},
        "methods": results,
        "targets": {name: {"max_ratio": limit, "ratio": results[name]["ratio"],
                           "met": results[name]["ratio"] <= limit}
                    for name, limit in TARGETS.items() if name in results},
    }
    if calib is not None:
        out["calibration"] = {"data": os.path.abspath(calibration), "sequences": len(calib), "seq_len": seq_len}
    if training_eval:
        from carpool.training.evaluate import heldout_perplexity

        out["training_eval"] = heldout_perplexity(model, data, seq_len=seq_len, max_sequences=num_sequences,
                                                  device=device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a float Hugging Face checkpoint directory (with its tokenizer)")
    ap.add_argument("--data", required=True, help="held-out token file prefix (`carpool pretokenize`)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sequences", type=int, default=32, help="N: held-out chunks scored (default 32)")
    ap.add_argument("--seq-len", type=int, default=512, help="L: scored tokens per chunk (default 512)")
    ap.add_argument("--dtype", default="auto", help="engine dtype of every method (default: the checkpoint's "
                    "on GPU, float32 on CPU)")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of {', '.join(m.name for m in METHODS)}")
    ap.add_argument("--group-size", type=int, default=128, help="INT4 group size (default 128)")
    ap.add_argument("--work-dir", default=None, help="keep the quantized checkpoints here (default: a temporary "
                    "directory, removed)")
    ap.add_argument("--calibration", default=None,
                    help="token file prefix for GPTQ's calibration (the train split); adds int4_gptq")
    ap.add_argument("--calibration-sequences", type=int, default=64,
                    help="chunks of seq-len + 1 tokens GPTQ calibrates on (default 64)")
    ap.add_argument("--training-eval", action="store_true",
                    help="also the training-side model's perplexity on the same tokens (carpool eval)")
    ap.add_argument("--out")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    emit(run_quality(args.model, args.data, args.device, args.sequences, args.seq_len, args.dtype, methods,
                     args.work_dir, args.group_size, args.training_eval, args.calibration,
                     args.calibration_sequences), args.out)


if __name__ == "__main__":
    main()
