"""All-reduce of the ranks' partial sums fused with the residual add and RMSNorm that follow it.

Why: in a tensor-parallel decoder every row-parallel projection (o_proj, down_proj) ends in an
all-reduce, and the very next op is always `fused_add_rms_norm`. At batch 1 the two kernels cost
some 7 + 3.5 us against a layer's ~50 us of weight reads, and the one-shot all-reduce meets its peers
twice (before reading them and again before returning). One kernel does it all here, with a single
meeting per call:

1. each program copies its rows of x (this rank's partial sums) into this rank's symmetric buffer;
2. it meets program `pid` of every peer: it writes its epoch into each peer's signal pad (release,
   system scope) and waits until every peer's epoch has reached its own (acquire);
3. it loads the peers' copies of its rows over NVLink, sums the ranks in rank order (so every rank gets
   the same bits), then adds the residual and normalizes with the rounding steps of
   `elementwise.fused_add_rms_norm` (at two ranks the sum is exact, so the residual stream is the
   unfused path's bit for bit; the norm's sum of squares may reduce in another order: one ulp apart).

Reuse without a second meeting: each row slot has two halves and a per-row bit picks one, flipped at
each use, so consecutive uses of a row alternate halves. A peer may still be reading a slot from the previous call
while this rank writes the next one (it passed the meeting, not the reads), but never from two calls
back: this rank's previous call waited for every peer to arrive at it, and a peer's program starts
only after the peer's earlier kernels finished (stream order, and `gdc_wait` under PDL). Epochs are
per program and the half bits per row, both in device memory, identical on every rank because every
rank runs the same calls with the same shapes; so CUDA graphs replay the kernel as is. Epochs compare
by signed difference, so they may wrap. The row width D must stay the same between calls (slots are
rows of D); NormExchange holds the exchange to one width.

The grid is at most `max_programs` (the caller passes at most the GPU's SM count), so every program of
a call is resident at once and no program can wait on a peer program that has no SM to run on.

Push exchange, for batch-1 steps (one row): the row-parallel GEMV itself sends its outputs
(ops/triton/gemv.py `gemv_push`), and `pushed_add_rms_norm` only waits for them, sums, adds and
normalizes. No meeting, no read across NVLink on the critical path: the partial sums travel while the
GEMV runs. Each GEMV program packs its two 16-bit outputs with the call's epoch into one 8-byte word and
writes it, with one aligned 8-byte store, into slot [half][its rank][program] of every rank (NCCL's "LL"
idea: the flag travels with the data, so no fence is needed; see gemv_push on the store). The norm
kernel polls its own slots until every rank's words carry the epoch, then unpacks them. The epoch is a
per-rank call counter in device memory (equal on every rank), read by the GEMV and advanced by the norm;
half = epoch & 1. A peer can be at most one call ahead (its next norm needs this rank's next GEMV, which
follows this rank's norm), and the next call writes the other half, so no slot is overwritten while
read. Epochs compare for equality, so they may wrap. The vocab-parallel embedding of a one-token step
pushes the same way (`embedding_push`: each rank its row or zeros), and the first layer's norm receives
it with a zero residual. The LM head's GEMV pushes its logits into slots of their own, and
`pushed_gather` receives every rank's row without advancing the epoch (see there): a batch-1 step's only
other collective is the broadcast of the sampled token. """

from __future__ import annotations

import torch
import triton
import triton.language as tl

from carpool.ops.triton import utils
from carpool.ops.triton.push_words import check_push_world, push_pairs, push_targets, receive_pairs
from carpool.ops.triton.utils import pdl_enter, pdl_wait_then_release

MAX_PROGRAMS = 128


@triton.jit
def _add_residual_and_norm(acc, res_ptr, w, out_ptr, res_out_ptr, cols, cmask, eps, D: tl.constexpr):
    """The end of both exchanges for one row: acc (the ranks' fp32 sum) rounds to the dtype as the
    all-reduce result would, the residual add rounds again (the unfused path's steps), then RMSNorm."""
    dtype = res_ptr.dtype.element_ty
    r = tl.load(res_ptr + cols, mask=cmask, other=0.0)
    h = (acc.to(dtype).to(tl.float32) + r.to(tl.float32)).to(dtype)
    tl.store(res_out_ptr + cols, h, mask=cmask)
    hf = h.to(tl.float32)[None, :]  # [1, BLOCK_D], the layout of the unfused norm kernel's long rows
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / D + eps)
    y = (hf * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]
    tl.store(out_ptr + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=cmask[None, :])


@triton.jit(do_not_specialize=["n_rows"])  # half_stride is fixed per process: specialized, for alignment
def _all_reduce_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, buffer_ptrs, pad_ptrs,
                                    epochs_ptr, uses_ptr, n_rows, half_stride, eps,
                                    RANK: tl.constexpr, WORLD: tl.constexpr, D: tl.constexpr,
                                    BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    pdl_enter(USE_PDL)
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    # Addresses loaded as integers carry no alignment: symmetric allocations are 16-byte aligned (at least).
    mine = tl.multiple_of(tl.load(buffer_ptrs + RANK).to(tl.pointer_type(dtype)), 16)
    for row in range(pid, n_rows, nprog):
        half = tl.load(uses_ptr + row)
        x = tl.load(x_ptr + row * D + cols, mask=cmask, other=0.0)
        tl.store(mine + half * half_stride + row * D + cols, x, mask=cmask)  # (the slot peers read below)
    tl.debug_barrier()  # every thread's copy is done before the release below publishes it
    epoch = tl.load(epochs_ptr + pid) + 1
    for p in tl.static_range(WORLD):
        if p != RANK:
            pad = tl.load(pad_ptrs + p).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(pad + pid * WORLD + RANK, epoch, sem="release", scope="sys")
    my_pad = tl.load(pad_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        if p != RANK:
            seen = tl.atomic_add(my_pad + pid * WORLD + p, 0, sem="acquire", scope="sys")
            while seen - epoch < 0:
                seen = tl.atomic_add(my_pad + pid * WORLD + p, 0, sem="acquire", scope="sys")
    tl.store(epochs_ptr + pid, epoch)
    tl.debug_barrier()  # no thread reads a peer before the acquire above
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for row in range(pid, n_rows, nprog):
        half = tl.load(uses_ptr + row)
        row_off = row * D  # n_rows * D <= half_stride: int32 is enough
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p in tl.static_range(WORLD):
            if p == RANK:
                part = tl.load(x_ptr + row_off + cols, mask=cmask, other=0.0)
            else:
                peer = tl.multiple_of(tl.load(buffer_ptrs + p).to(tl.pointer_type(dtype)), 16)
                part = tl.load(peer + half * half_stride + row_off + cols, mask=cmask, other=0.0,
                               cache_modifier=".cg")
            acc += part.to(tl.float32)
        tl.store(uses_ptr + row, 1 - half)
        _add_residual_and_norm(acc, res_ptr + row_off, w, out_ptr + row_off, res_out_ptr + row_off, cols, cmask,
                               eps, D)


def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            buffer_ptrs: torch.Tensor, pad_ptrs: torch.Tensor, epochs: torch.Tensor,
                            uses: torch.Tensor, half_stride: int, rank: int, world_size: int,
                            max_programs: int = MAX_PROGRAMS) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual) for x, residual [N, D] contiguous.

    buffer_ptrs / pad_ptrs: int64 [world_size] addresses of every rank's symmetric data buffer (two
    halves of `half_stride` elements) and int32 signal pads ([MAX_PROGRAMS * world_size], zeroed once);
    epochs: int32 [MAX_PROGRAMS] and uses: int32 [>= N] (half bits), this rank's, zeroed once;
    max_programs: at most MAX_PROGRAMS and the SM count. Every rank must make
    the same calls with the same shapes."""
    n, d = x.shape
    if residual.shape != x.shape or residual.dtype != x.dtype or not (x.is_contiguous() and residual.is_contiguous()):
        raise ValueError(f"x, residual: expected equal contiguous [N, D], got {tuple(x.shape)} {x.dtype} "
                         f"and {tuple(residual.shape)} {residual.dtype}")
    if weight.shape != (d,):
        raise ValueError(f"weight: expected shape ({d},), got {tuple(weight.shape)}")
    if n > uses.numel() or n * d > half_stride:
        raise ValueError(f"x: {n} rows of {d} do not fit the exchange buffer")
    out = utils.empty_output(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    res_out = utils.empty_output(x.shape, dtype=x.dtype, device=x.device)
    if n == 0:
        return out, res_out
    block_d = triton.next_power_of_2(d)
    _all_reduce_add_rms_norm_kernel[(min(n, max_programs, MAX_PROGRAMS),)](
        x, residual, weight, out, res_out, buffer_ptrs, pad_ptrs, epochs, uses, n, half_stride, eps,
        RANK=rank, WORLD=world_size, D=d, BLOCK_D=block_d, num_warps=4 if block_d <= 2048 else 8,
        USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out, res_out


@triton.jit
def _embedding_push_kernel(ids_ptr, w_ptr, out_ptr, vocab_start, shard_size, stride_w, slot_ptrs, epoch_ptr,
                           slot_stride, HALF_D: tl.constexpr, BLOCK: tl.constexpr, RANK: tl.constexpr,
                           WORLD: tl.constexpr, USE_PDL: tl.constexpr):
    # Wait, then release (as the GEMV does): the pushed norm after any push producer reads the epoch
    # before its own wait, which is safe only if the norm before it has finished (see that kernel).
    pdl_wait_then_release(USE_PDL)
    peers, epoch = push_targets(slot_ptrs, epoch_ptr, WORLD)
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pmask = pairs < HALF_D
    local = tl.zeros([BLOCK], dtype=tl.int64) + (tl.load(ids_ptr).to(tl.int64) - vocab_start)
    mine = pmask & (local >= 0) & (local < shard_size)  # else this rank's share is zeros
    row = w_ptr + local * stride_w
    lo = tl.load(row + 2 * pairs, mask=mine, other=0.0)
    hi = tl.load(row + 2 * pairs + 1, mask=mine, other=0.0)
    tl.store(out_ptr + 2 * pairs, lo, mask=pmask)
    tl.store(out_ptr + 2 * pairs + 1, hi, mask=pmask)
    bits = ((lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
            | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16))
    push_pairs(bits, pairs, pmask, peers, epoch, slot_stride, RANK, WORLD)


def embedding_push(token_id: torch.Tensor, weight: torch.Tensor, vocab_start: int, slot_ptrs: torch.Tensor,
                   epoch: torch.Tensor, slot_stride: int, rank: int, world_size: int) -> torch.Tensor:
    """A vocab-parallel embedding of one token, pushed: this rank's share of the row (its weight row if
    the token is in its vocab slice [vocab_start, + weight rows), else zeros), returned as [1, D] and
    sent to every rank's slots like gemv_push, for the next pushed_add_rms_norm to sum. weight: 16-bit
    [rows, D], D even; token_id: one int64 on the device."""
    if token_id.numel() != 1:
        raise ValueError(f"token_id: expected one token, got {tuple(token_id.shape)}")
    check_push_world("embedding_push", world_size)
    rows, d = weight.shape
    if d % 2 or d // 2 > slot_stride or weight.stride(-1) != 1 or weight.element_size() != 2:
        raise ValueError(f"weight: expected 16-bit [rows, D] with D even and D <= {2 * slot_stride}, "
                         f"contiguous in D, got {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty(1, d, dtype=weight.dtype, device=weight.device)
    block = min(512, triton.next_power_of_2(d // 2))
    _embedding_push_kernel[(triton.cdiv(d // 2, block),)](
        token_id, weight, out, vocab_start, rows, weight.stride(0), slot_ptrs, epoch, slot_stride, HALF_D=d // 2,
        BLOCK=block, RANK=rank, WORLD=world_size, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out


@triton.jit
def _pushed_add_rms_norm_kernel(slots_ptr, epoch_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, slot_stride, eps,
                                WORLD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr):
    # Under PDL this kernel starts while the push producer before it (GEMV or embedding) runs, and polls
    # at once: its slots and the epoch are written by no kernel it could overtake. The epoch is written
    # only by the previous norm, which has finished: a producer lets this kernel launch only after its
    # own wait (pdl_wait_then_release), which follows that norm. It waits for the producer's grid only
    # before its first write, so the polling overlaps the producer's last programs (EXPERIMENTS.md, run 49: TP=2
    # batch-1 decode 2.544 -> 2.526 ms/token; not waiting at all gave 2.523).
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    dtype = res_ptr.dtype.element_ty
    half_d: tl.constexpr = BLOCK_D // 2
    pairs = tl.arange(0, half_d)
    pmask = pairs < D // 2
    epoch = tl.load(epoch_ptr, volatile=True) + 1  # (before the wait: never a cached value)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for p in tl.static_range(WORLD):  # rank order: every rank sums the same bits the same way
        lo, hi = receive_pairs(slots_ptr + ((epoch & 1) * WORLD + p) * slot_stride, pairs, pmask, epoch, dtype)
        acc += tl.reshape(tl.join(lo, hi), [BLOCK_D]).to(tl.float32)  # outputs 2j, 2j + 1 of program j
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    tl.store(epoch_ptr, epoch)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    _add_residual_and_norm(acc, res_ptr, w, out_ptr, res_out_ptr, cols, cmask, eps, D)


def pushed_add_rms_norm(residual: torch.Tensor, weight: torch.Tensor, eps: float, slots: torch.Tensor,
                        epoch: torch.Tensor, slot_stride: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual) for the one row x that every rank's
    `gemv_push` of this call wrote into `slots` (this rank's, int64 [2 * world_size * slot_stride]);
    epoch: this rank's int32 [1] call counter, shared with gemv_push. residual: [1, D], 16-bit, D even."""
    if residual.dim() != 2 or residual.shape[0] != 1 or residual.shape[1] % 2 or not residual.is_contiguous():
        raise ValueError(f"residual: expected one contiguous row of even width, got {tuple(residual.shape)}")
    d = residual.shape[1]
    if weight.shape != (d,) or d // 2 > slot_stride:
        raise ValueError(f"weight: expected shape ({d},) with {d} <= {2 * slot_stride}, got {tuple(weight.shape)}")
    out = utils.empty_output(residual.shape, dtype=torch.result_type(weight, residual), device=residual.device)
    res_out = utils.empty_output(residual.shape, dtype=residual.dtype, device=residual.device)
    block_d = triton.next_power_of_2(d)
    _pushed_add_rms_norm_kernel[(1,)](slots, epoch, residual, weight, out, res_out, slot_stride, eps, WORLD=world_size,
                                      D=d, BLOCK_D=block_d, num_warps=4 if block_d <= 2048 else 8,
                                      USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out, res_out


@triton.jit
def _pushed_gather_kernel(slots_ptr, epoch_ptr, out_ptr, slot_stride, shard, HALF_SHARD: tl.constexpr,
                          WORLD: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    # Program (b, r) receives pairs [b * BLOCK, (b + 1) * BLOCK) of rank r's row. Unlike the pushed norm it
    # polls only after its PDL wait (this rank's producer has finished): its many programs would
    # otherwise poll L2 while the LM head GEMV streams its weights.
    pdl_enter(USE_PDL)
    rank = tl.program_id(1)
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pmask = pairs < HALF_SHARD
    epoch = tl.load(epoch_ptr) + 1  # what the producer pushed; not advanced (pushed_gather)
    lo, hi = receive_pairs(slots_ptr + ((epoch & 1) * WORLD + rank) * slot_stride, pairs, pmask, epoch,
                           out_ptr.dtype.element_ty)
    row = out_ptr + rank * shard
    tl.store(row + 2 * pairs, lo, mask=pmask)
    tl.store(row + 2 * pairs + 1, hi, mask=pmask)


def pushed_gather(slots: torch.Tensor, epoch: torch.Tensor, slot_stride: int, world_size: int, shard: int,
                  dtype: torch.dtype, block: int | None = None) -> torch.Tensor:
    """[1, world_size * shard]: every rank's row of `shard` 16-bit values side by side, received from the
    `gemv_push` of this call into `slots` (this rank's, int64 [2 * world_size * slot_stride], used by no
    other exchange). Why: a batch-1 step's logits then cross NVLink while the LM head GEMV runs, instead
    of in an all-gather after it. block: pairs per program (a power of two; default up to 1024).

    It does not advance the epoch, unlike the norm (its programs could not agree on when to): it
    expects the words of epoch + 1, which the caller must guarantee to be new, by receiving at least one
    push with a norm (which advances the epoch) between two gathers (PushExchange.gather_logits)."""
    if shard % 2 or shard // 2 > slot_stride or dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"pushed_gather: expected a 16-bit row of even width <= {2 * slot_stride}, got "
                         f"{shard} of {dtype}")
    out = utils.empty_output((1, world_size * shard), dtype=dtype, device=slots.device)
    block = block or min(1024, triton.next_power_of_2(shard // 2))
    grid = (triton.cdiv(shard // 2, block), world_size)
    _pushed_gather_kernel[grid](slots, epoch, out, slot_stride, shard, HALF_SHARD=shard // 2, WORLD=world_size,
                                BLOCK=block, num_warps=4, USE_PDL=utils.pdl(), launch_pdl=utils.pdl())
    return out
