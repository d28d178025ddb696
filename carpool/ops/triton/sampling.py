"""Sampling in one pass over the logits (GPU): greedy rows take the argmax, random rows the argmax of
logits / T + Gumbel noise, which draws from softmax(logits / T) without ever materializing it.

The general sampler (layers/sampler.py) makes about eight passes over a [batch, vocab] float32 tensor
(cast, copy, softmax, noise, divide, argmax...); at batch 256 and a 152k vocabulary that is ~1.7 GB per
step. These kernels read the bf16 logits once (split over
column chunks, then a tiny per-row reduction). The noise comes from Philox keyed by a per-row seed and the
column, so a row's draw depends only on its own seed: a seeded request samples the same token whatever
else is in the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.utils import pdl_enter

# Each program scans CHUNK columns of one row, so a row is spread over many SMs: at batch 1 a single
# program per row took ~0.1 ms for a 128k vocabulary, about 2% of an 8B model's decode step.
# Philox yields four numbers per evaluation (tl.rand4x); they go to four QUARTER-wide sub-tiles, which
# cuts the generator's cost (the bulk of this kernel's time at batch 256) by four.
QUARTER = 256
BLOCK = 4 * QUARTER
CHUNK = 4 * BLOCK


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    """log2 as one MUFU instruction (lg2.approx, relative error ~2^-22) on a GPU, where tl.log's
    ~20-instruction polynomial made the two logs per column most of this kernel's time at batch 256;
    tl.log2 in the interpreter, which has no libdevice."""
    if FAST_LOG:
        return tl.extra.cuda.libdevice.fast_log2f(x)
    return tl.log2(x)


@triton.jit
def _fold(best, best_idx, base, cols, u, inv_t, greedy, vocab, FAST_LOG: tl.constexpr):
    """Fold the columns `cols` (with uniforms u) into the running per-lane best score and column."""
    mask = cols < vocab
    x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
    # Gumbel(0, 1) = -ln(-ln u) = -ln2 * log2(-log2 u) - ln(ln 2); the constant is the same for every
    # column, so the argmax needs only the first term. Greedy rows add nothing.
    e = tl.maximum(-_log2(tl.maximum(u, 1e-20), FAST_LOG), 1e-30)
    gumbel = tl.where(greedy, 0.0, -0.6931471805599453 * _log2(e, FAST_LOG))
    score = tl.where(mask, x * inv_t + gumbel, float("-inf"))
    better = score > best  # strict: the lowest index wins ties, like torch.argmax
    return tl.where(better, score, best), tl.where(better, cols, best_idx)


@triton.jit
def _sample_partial_kernel(logits_ptr, stride_row, temperature_ptr, seed_ptr, part_score_ptr, part_idx_ptr,
                           vocab, n_chunks, QUARTER: tl.constexpr, CHUNK: tl.constexpr, FAST_LOG: tl.constexpr,
                           USE_PDL: tl.constexpr):
    """Best (score, column) of one CHUNK of one row; score = logit / T + Gumbel noise (greedy: logit)."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    greedy = temperature < 1e-5
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    best = tl.full([QUARTER], float("-inf"), dtype=tl.float32)
    best_idx = tl.full([QUARTER], 2147483647, dtype=tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, QUARTER)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, vocab), 4 * QUARTER):
        # Philox keyed by (row seed, column): column start + k * QUARTER + j takes number k of the
        # evaluation at offset start / 4 + j, so the draw depends on neither the chunking nor the batch.
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + lanes)
        best, best_idx = _fold(best, best_idx, base, start + lanes, u0, inv_t, greedy, vocab, FAST_LOG)
        best, best_idx = _fold(best, best_idx, base, start + QUARTER + lanes, u1, inv_t, greedy, vocab,
                               FAST_LOG)
        best, best_idx = _fold(best, best_idx, base, start + 2 * QUARTER + lanes, u2, inv_t, greedy, vocab,
                               FAST_LOG)
        best, best_idx = _fold(best, best_idx, base, start + 3 * QUARTER + lanes, u3, inv_t, greedy, vocab,
                               FAST_LOG)
    top = tl.max(best, axis=0)
    # lowest column among the lanes holding the maximum
    winner = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
    out = row.to(tl.int64) * n_chunks + chunk
    tl.store(part_score_ptr + out, top)
    tl.store(part_idx_ptr + out, winner)


@triton.jit
def _sample_reduce_kernel(part_score_ptr, part_idx_ptr, out_ptr, n_chunks, BLOCK_C: tl.constexpr,
                          USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < n_chunks
    score = tl.load(part_score_ptr + row * n_chunks + c, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * n_chunks + c, mask=mask, other=2147483647)
    top = tl.max(score, axis=0)
    winner = tl.min(tl.where(score == top, idx, 2147483647), axis=0)
    # A row of all -inf (every column masked) has no winner; take column 0 rather than an invalid id.
    winner = tl.where(winner == 2147483647, 0, winner)
    tl.store(out_ptr + row, winner.to(tl.int64))


def reduce_partials(part_score: torch.Tensor, part_idx: torch.Tensor) -> torch.Tensor:
    """[N] int64: per row, the column of the best of its partial (score, column) pairs ([N, P] float32
    and int32), the lowest column on ties; column 0 for a row whose scores are all -inf."""
    n, parts = part_score.shape
    out = torch.empty(n, dtype=torch.int64, device=part_score.device)
    if n:
        _sample_reduce_kernel[(n,)](part_score, part_idx, out, parts, BLOCK_C=max(16, triton.next_power_of_2(parts)),
                                    num_warps=1, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


def sample_from_logits(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (any float dtype, last dim contiguous), temperature [N] float32 (0 = greedy),
    seeds [N] int64 -> sampled token ids [N] int64."""
    n, vocab = logits.shape
    if not n:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n_chunks = triton.cdiv(vocab, CHUNK)
    part_score = torch.empty((n, n_chunks), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((n, n_chunks), dtype=torch.int32, device=logits.device)
    _sample_partial_kernel[(n, n_chunks)](logits, logits.stride(0), temperature, seeds, part_score, part_idx,
                                          vocab, n_chunks, QUARTER=QUARTER, CHUNK=CHUNK, num_warps=4,
                                          FAST_LOG=not utils.interpreting(),
                                          USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return reduce_partials(part_score, part_idx)
