"""The push exchange's word format: how a producer kernel (a GEMV, the embedding, the LM head) packs its
16-bit outputs with the call's epoch into 8-byte words and stores them into every rank's slots, and how a
consumer polls its own slots until every word carries the epoch.

Kept apart from the exchange's kernels (all_reduce_norm.py) so that a single-GPU kernel with a push
epilogue (the GEMV) depends only on this format, not on the tensor-parallel kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_PUSH_WORLD = 8  # ranks a push producer can address (push_targets loads them as one vector)
_PUSH_LANES = tl.constexpr(MAX_PUSH_WORLD)  # (the same, as kernels can read it)


def check_push_world(name: str, world_size: int) -> None:
    """ValueError unless a push producer can address world_size ranks."""
    if not 1 <= world_size <= MAX_PUSH_WORLD:
        raise ValueError(f"{name}: world_size must be 1..{MAX_PUSH_WORLD}, got {world_size}")


@triton.jit
def push_targets(slot_ptrs, epoch_ptr, WORLD: tl.constexpr):
    """The producer's targets, loaded before its main work so that their latency overlaps it: every
    rank's slot buffer address and this call's epoch. After the kernel's PDL wait (the previous norm
    wrote the epoch). Why early: loaded after the GEMV's reduction they held every program ~1 µs longer
    (EXPERIMENTS.md, run 52: down_proj's push 11% slower than the plain GEMV)."""
    ranks = tl.arange(0, _PUSH_LANES)
    peers = tl.load(slot_ptrs + ranks, mask=ranks < WORLD, other=0)
    return peers, tl.load(epoch_ptr) + 1


@triton.jit
def push_pairs(pairs, index, mask, peers, epoch, slot_stride, RANK: tl.constexpr, WORLD: tl.constexpr):
    """The producer's side of the push exchange: each int32 of `pairs` (two 16-bit outputs, the first in
    the low half) is pair `index` of the row; with the call's epoch it makes one 8-byte word, stored in
    slot [epoch & 1][RANK][index] of every rank. peers, epoch: push_targets'."""
    word = (epoch.to(tl.int64) << 32) | (pairs.to(tl.int64) & 0xFFFFFFFF)
    slot = ((epoch & 1) * WORLD + RANK) * slot_stride + index
    for p in tl.static_range(WORLD):
        peer = tl.sum(tl.where(tl.arange(0, _PUSH_LANES) == p, peers, 0), axis=0).to(tl.pointer_type(tl.int64))
        # One aligned 8-byte store: posted (an atomic here held each GEMV program until the peer
        # answered: EXPERIMENTS.md, run 44, 1.3% slower at batch 1 than no push at all). Like NCCL's LL protocol
        # this relies on an aligned 8-byte write arriving whole; the PTX model promises that only for
        # .relaxed/.volatile stores, which tl.store does not emit (such a store through inline asm was
        # not tried).
        tl.store(peer + slot, word, mask=mask)


@triton.jit
def receive_pairs(base, pairs, pmask, epoch, dtype: tl.constexpr):
    """The consumer's side: poll this rank's slots base[pairs] until every word carries `epoch`, then
    unpack them: (first, second) 16-bit outputs of each pair, as `dtype`."""
    word = tl.load(base + pairs, mask=pmask, other=0, volatile=True)
    waiting = tl.sum((pmask & ((word >> 32).to(tl.int32) != epoch)).to(tl.int32), axis=0)
    while waiting > 0:
        word = tl.load(base + pairs, mask=pmask, other=0, volatile=True)
        waiting = tl.sum((pmask & ((word >> 32).to(tl.int32) != epoch)).to(tl.int32), axis=0)
    data = word.to(tl.int32)
    return data.to(tl.int16).to(dtype, bitcast=True), (data >> 16).to(tl.int16).to(dtype, bitcast=True)
