"""Kernels that read and write pinned host memory themselves, in place of copy-engine transfers at the
boundary between two decode steps.

Why: a batch-1 decode step ends with its token's copy to the host and the next begins with the upload
of its inputs, a device-to-device copy of its block tables and an index_copy_ of the tokens the last
step sampled. On an H200 the copies take 1-2 us each, but the device idles 15-20 us around them per
step, mostly waiting on the copy engine after a graph or a kernel (EXPERIMENTS.md, runs 58-61). Pinned
memory is addressable from the device (unified addressing), so one kernel can write the token to the
host and one can read the step's inputs from it. In isolation this took 5.5 us for the whole boundary,
against 15.1 with the copies (benchmarks/bench_step_boundary.py, EXPERIMENTS.md run 62).
In the engine, the Llama-3-8B shape at batch 1, it gained less (EXPERIMENTS.md run 63):
- TP=1: 3.9228 ms/token against 3.9300;
- TP=2: within the repeats' spread.
Larger steps keep the copies (worker/cuda_graph.HOST_IO_MAX_ROWS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit(do_not_specialize=["n"])  # (sizes change per step: one compiled variant)
def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


def copy_to_host(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst[:] = src by a kernel: src on the device, dst in pinned host memory (or the other way), same
    dtype and size, both contiguous. The host may read dst once an event recorded after this call has
    completed."""
    if src.dtype != dst.dtype or src.numel() != dst.numel() or not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError(f"copy_to_host: expected contiguous tensors of one dtype and size, got {src.dtype} "
                         f"{tuple(src.shape)} and {dst.dtype} {tuple(dst.shape)}")
    n = src.numel()
    if n:
        _copy_kernel[(triton.cdiv(n, BLOCK),)](src, dst, n, BLOCK=BLOCK)


@triton.jit(do_not_specialize=["n_ids", "words_lo", "words_hi", "table_stride", "n_table_words", "width"])
def _stage_kernel(host_ids_ptr, ids_ptr, fix_src_ptr, fix_val_ptr, n_ids, host_words_ptr, words_ptr, words_lo,
                  words_hi, host_tables_ptr, tables_ptr, table_stride, n_table_words, width,
                  HAS_FIXUP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # the input ids, with the tokens the last step sampled (still on the device) where fix_src >= 0
    m = offs < n_ids
    ids = tl.load(host_ids_ptr + offs, mask=m)
    if HAS_FIXUP:
        src = tl.load(fix_src_ptr + offs, mask=m, other=-1)
        ids = tl.where(src >= 0, tl.load(fix_val_ptr + src, mask=m & (src >= 0), other=0), ids)
    tl.store(ids_ptr + offs, ids, mask=m)
    # every other field, word for word
    w = words_lo + offs
    wm = w < words_hi
    tl.store(words_ptr + w, tl.load(host_words_ptr + w, mask=wm), mask=wm)
    # the packed [rows, width] block tables into their [rows, table_stride] home
    tm = offs < n_table_words
    tl.store(tables_ptr + (offs // width) * table_stride + offs % width, tl.load(host_tables_ptr + offs, mask=tm),
             mask=tm)


def stage_inputs(host_ids: torch.Tensor, ids: torch.Tensor, fixup_source: torch.Tensor | None,
                 fixup_values: torch.Tensor | None, host_words: torch.Tensor, words: torch.Tensor, words_lo: int,
                 words_hi: int, host_tables: torch.Tensor, tables: torch.Tensor) -> None:
    """A CUDA-graph replay's inputs from pinned host memory, in one kernel:
    - ids[i] = fixup_values[fixup_source[i]] where fixup_source[i] >= 0, else host_ids[i] (int64 [n]:
      the input ids, with the tokens the last step sampled, which only the device has yet);
    - words[words_lo:words_hi] = host_words[words_lo:words_hi] (int32 views of the rest of the buffer);
    - tables[r, c] = host_tables[r * width + c] for the packed [rows, width] host_tables (int32, the
      step's block tables) into tables [>= rows, >= width] (row stride table_stride).
    fixup_source: int32 [n] on the host (-1: keep host_ids); None: no fix-up."""
    rows, width = host_tables.shape
    if (fixup_source is None) != (fixup_values is None):
        raise ValueError("stage_inputs: pass fixup_source and fixup_values together, or neither")
    if fixup_values is not None and (fixup_values.dtype != ids.dtype or not fixup_values.is_contiguous()):
        raise ValueError(f"stage_inputs: fixup_values must be contiguous {ids.dtype}, got {fixup_values.dtype}")
    if not 0 <= words_lo <= words_hi <= min(host_words.numel(), words.numel()):
        raise ValueError(f"stage_inputs: word range [{words_lo}, {words_hi}) outside the buffers")
    if tables.shape[0] < rows or tables.shape[1] < width or tables.stride(1) != 1 or ids.numel() < host_ids.numel():
        raise ValueError(f"stage_inputs: tables {tuple(tables.shape)} cannot take {rows} x {width}, or ids "
                         f"{ids.numel()} < {host_ids.numel()}")
    n = max(host_ids.numel(), words_hi - words_lo, rows * width)
    fix = fixup_source is not None
    _stage_kernel[(triton.cdiv(n, BLOCK),)](
        host_ids, ids, fixup_source if fix else host_ids, fixup_values if fix else ids, host_ids.numel(), host_words,
        words, words_lo, words_hi, host_tables, tables, tables.stride(0), rows * width, max(width, 1),
        HAS_FIXUP=fix, BLOCK=BLOCK)
