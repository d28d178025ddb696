"""The tensor-parallel kernels and their wiring in the model, over ranks simulated on one device: the fused
all-reduce + RMSNorm, the batch-1 push exchange (GEMV, embedding and LM-head pushes, the pushed norm and
gather), and the communicator calls that connect projections, norms and the LM head."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("triton")
from triton_cases import DEVICE, INTERPRET, poison_outputs

from carpool.ops import torch_ref  # noqa: E402
from carpool.ops import triton as tri  # noqa: E402

# Idle decode splits compute log2(0) = -inf on purpose; numpy warns about it in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_outputs(monkeypatch)


def run_ranks(world: int, call: Callable[[int], tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """Run call(r) for every simulated rank concurrently, as the ranks of a real group would. On a GPU
    each rank gets its own stream (launches return at once). The interpreter runs a launch to completion
    and keeps global state, so ranks 1.. run in forked processes: memory shared before the fork sits at
    the same addresses in every process, so raw addresses work across them as peer addresses do."""
    if not INTERPRET:
        streams = [torch.cuda.Stream() for _ in range(world)]
        results = []
        for r in range(world):
            streams[r].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[r]):
                results.append(call(r))
        for st in streams:
            torch.cuda.current_stream().wait_stream(st)
        torch.cuda.synchronize()
        return results
    ctx = multiprocessing.get_context("fork")
    children = []
    for r in range(1, world):
        mine, theirs = ctx.Pipe()

        def child(r: int = r, conn: Any = theirs) -> None:
            conn.send([t.numpy().copy() for t in call(r)])  # (torch would pass tensors as file handles)
        proc = ctx.Process(target=child, daemon=True)
        proc.start()
        children.append((proc, mine))
    results = [call(0)]
    for proc, conn in children:
        assert conn.poll(300), "a rank is still waiting at the barrier (or failed: see its stderr)"
        results.append(tuple(torch.from_numpy(a) for a in conn.recv()))
        proc.join()
    return results


def shared(t: torch.Tensor) -> torch.Tensor:
    """A simulated rank's exchange buffer: in the interpreter, memory the forked ranks see (run_ranks)."""
    return t.share_memory_() if INTERPRET else t


@pytest.mark.parametrize("world", [1, 2, 3])
def test_all_reduce_add_rms_norm_over_simulated_ranks(world: int) -> None:
    """The fused all-reduce + add + RMSNorm with `world` ranks simulated in one process (the symmetric
    buffers are plain tensors whose addresses every rank gets): each rank's result equals the torch
    reference applied to the sum of the ranks' inputs, every rank gets the same bits, and the exchange
    state stays consistent across calls with different row counts (more rows than programs included)."""
    from carpool.ops.triton.all_reduce_norm import MAX_PROGRAMS, all_reduce_add_rms_norm

    d, half = 48, 200 * 48
    gen = torch.Generator().manual_seed(world)
    data = [shared(torch.full((2 * half,), float("nan"), device=DEVICE)) for _ in range(world)]
    # Epochs start two calls short of the int32 limit (pads as if every rank had arrived there): they wrap.
    start = 2 ** 31 - 2
    pads = [shared(torch.full((MAX_PROGRAMS * world,), start, dtype=torch.int32, device=DEVICE)) for _ in range(world)]
    buffer_ptrs = torch.tensor([t.data_ptr() for t in data], dtype=torch.int64, device=DEVICE)
    pad_ptrs = torch.tensor([t.data_ptr() for t in pads], dtype=torch.int64, device=DEVICE)
    epochs = [shared(torch.full((MAX_PROGRAMS,), start, dtype=torch.int32, device=DEVICE)) for _ in range(world)]
    uses = [shared(torch.zeros(200, dtype=torch.int32, device=DEVICE)) for _ in range(world)]
    w = torch.randn(d, generator=gen).to(DEVICE)
    max_programs = (MAX_PROGRAMS if INTERPRET
                    else min(MAX_PROGRAMS, torch.cuda.get_device_properties(0).multi_processor_count))
    if not INTERPRET:
        # Compile and load every rank's kernel first, alone, against pads that read as already signalled:
        # a first launch loads its module, which waits for the running kernels, so a rank spinning on
        # the same GPU would wait forever for a peer whose kernel cannot load.
        ready = torch.full((MAX_PROGRAMS * world,), 1 << 30, dtype=torch.int32, device=DEVICE)
        scratch = torch.empty(2 * half, device=DEVICE)
        for r in range(world):
            all_reduce_add_rms_norm(w[None], w[None], w, 1e-6,
                                    torch.tensor([scratch.data_ptr()] * world, device=DEVICE),
                                    torch.tensor([ready.data_ptr()] * world, device=DEVICE),
                                    torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=DEVICE),
                                    torch.zeros(1, dtype=torch.int32, device=DEVICE), half, r, world)
        torch.cuda.synchronize()
    for rows in (5, 1, MAX_PROGRAMS + 2, 5):
        xs = [torch.randn(rows, d, generator=gen).to(DEVICE) for _ in range(world)]
        residual = torch.randn(rows, d, generator=gen).to(DEVICE)
        outs = run_ranks(world, lambda r: all_reduce_add_rms_norm(xs[r], residual, w, 1e-6, buffer_ptrs, pad_ptrs,
                                                                  epochs[r], uses[r], half, r, world, max_programs))
        total = xs[0].clone()
        for x in xs[1:]:
            total += x
        ref_out, ref_res = torch_ref.fused_add_rms_norm(total, residual, w, 1e-6)
        for out, res in outs:
            assert torch.equal(out, outs[0][0]) and torch.equal(res, outs[0][1])
            torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
            torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for r in range(world):
        # program p took part in every call with more than p rows; row i was used once per call covering it
        wrapped = [(start + n + 2 ** 31) % 2 ** 32 - 2 ** 31 for n in (4, 3, 1)]  # int32 arithmetic
        assert epochs[r][:2].tolist() == wrapped[:2] and epochs[r][MAX_PROGRAMS - 1].item() == wrapped[2]
        # row i's half bit flipped once per call covering it: 4, 3, 3, 3, 3, 1 (and 1) uses
        assert uses[r][:6].tolist() == [0, 1, 1, 1, 1, 1] and uses[r][MAX_PROGRAMS + 1].item() == 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gemv_push_then_pushed_add_rms_norm_over_simulated_ranks(world: int) -> None:
    """The batch-1 push exchange with `world` simulated ranks: each rank's GEMV writes its outputs with
    the call's epoch into every rank's slots, each rank's norm waits for them and reduces. Every rank
    gets the same bits, equal to the reference on the sum of the ranks' GEMV outputs; row widths change
    between calls, both halves are reused, and the epochs wrap past the int32 limit."""
    from carpool.ops.triton.all_reduce_norm import pushed_add_rms_norm
    from carpool.ops.triton.gemv import gemv, gemv_push

    dt = torch.float16 if INTERPRET else torch.bfloat16  # (16-bit words; numpy has no bfloat16)
    stride = 32  # slots per rank and half: rows up to 64
    gen = torch.Generator().manual_seed(10 + world)
    slots = [shared(torch.zeros(2 * world * stride, dtype=torch.int64, device=DEVICE)) for _ in range(world)]
    slot_ptrs = torch.tensor([t.data_ptr() for t in slots], dtype=torch.int64, device=DEVICE)
    start = 2 ** 31 - 2
    epochs = [shared(torch.full((1,), start, dtype=torch.int32, device=DEVICE)) for _ in range(world)]
    calls = ((48, 40), (20, 70), (64, 40), (48, 40))
    if not INTERPRET:
        # Compile and load every kernel alone first (see the test above), against slots that read as
        # already written for epoch 1: a first launch waits for running kernels, spinning ones included.
        for n, k in calls:
            for r in range(world):
                ready = torch.full((2 * world * stride,), 1 << 32, dtype=torch.int64, device=DEVICE)
                zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
                w_dummy = torch.zeros(n, k, dtype=dt, device=DEVICE)
                gemv_push(torch.zeros(1, k, dtype=dt, device=DEVICE), w_dummy,
                          torch.tensor([ready.data_ptr()] * world, device=DEVICE), zero, stride, r, world)
                pushed_add_rms_norm(torch.zeros(1, n, dtype=dt, device=DEVICE), torch.ones(n, dtype=dt, device=DEVICE),
                                    1e-6, ready, torch.zeros(1, dtype=torch.int32, device=DEVICE), stride, world)
        torch.cuda.synchronize()
    for n, k in calls:
        xs = [torch.randn(1, k, generator=gen).to(DEVICE, dt) for _ in range(world)]
        ws = [(0.3 * torch.randn(n, k, generator=gen)).to(DEVICE, dt) for _ in range(world)]
        residual = torch.randn(1, n, generator=gen).to(DEVICE, dt)
        norm_w = torch.rand(n, generator=gen).to(DEVICE, dt)

        def call(r: int) -> tuple[torch.Tensor, ...]:
            y = gemv_push(xs[r], ws[r], slot_ptrs, epochs[r], stride, r, world)
            return (y, *pushed_add_rms_norm(residual, norm_w, 1e-6, slots[r], epochs[r], stride, world))
        outs = run_ranks(world, call)
        parts = [gemv(xs[r], ws[r]) for r in range(world)]
        total = sum(p.float() for p in parts).to(dt)  # rank order, float32, one rounding
        ref_out, ref_res = torch_ref.fused_add_rms_norm(total, residual, norm_w, 1e-6)
        for r, (y, out, res) in enumerate(outs):
            assert torch.equal(y.cpu(), parts[r].cpu())  # the partial sums it returns are gemv's
            assert torch.equal(out, outs[0][1]) and torch.equal(res, outs[0][2])
            torch.testing.assert_close(res.cpu(), ref_res.cpu(), atol=0, rtol=0)
            torch.testing.assert_close(out.float().cpu(), ref_out.float().cpu(), atol=2e-2, rtol=2e-2)
    wrapped = (start + len(calls) + 2 ** 31) % 2 ** 32 - 2 ** 31  # int32 arithmetic
    assert [e.item() for e in epochs] == [wrapped] * world


@pytest.mark.parametrize("world", [2, 3])
def test_embedding_push_then_gemv_push_over_simulated_ranks(world: int) -> None:
    """A batch-1 step's start with `world` simulated ranks: each rank pushes its vocab slice's share of one
    token's embedding (its row, or zeros), the first norm sums them with a zero residual, then a GEMV
    push and its norm follow on the same epochs. Every rank gets the same bits: the full table's row and
    its norm, for tokens in the first and the last slice and beyond every slice."""
    from carpool.ops.triton.all_reduce_norm import embedding_push, pushed_add_rms_norm
    from carpool.ops.triton.gemv import gemv, gemv_push

    dt = torch.float16 if INTERPRET else torch.bfloat16
    stride, rows, d = 32, 5, 48  # (rows of several programs: test_custom_all_reduce's self-test check)
    gen = torch.Generator().manual_seed(20 + world)
    slots = [shared(torch.zeros(2 * world * stride, dtype=torch.int64, device=DEVICE)) for _ in range(world)]
    slot_ptrs = torch.tensor([t.data_ptr() for t in slots], dtype=torch.int64, device=DEVICE)
    epochs = [shared(torch.zeros(1, dtype=torch.int32, device=DEVICE)) for _ in range(world)]
    table = torch.randn(rows * world, d, generator=gen).to(DEVICE, dt)
    w = (0.3 * torch.randn(d, d, generator=gen)).to(DEVICE, dt)
    norm_w = torch.rand(d, generator=gen).to(DEVICE, dt)
    zeros = torch.zeros(1, d, dtype=dt, device=DEVICE)
    if not INTERPRET:  # compile and load each kernel alone first (see the test above)
        ready = torch.full((2 * world * stride,), 1 << 32, dtype=torch.int64, device=DEVICE)
        ready_ptrs = torch.tensor([ready.data_ptr()] * world, device=DEVICE)
        for r in range(world):  # (each rank's own vocab_start: 0 and multiples of 16 compile apart)
            embedding_push(torch.zeros(1, dtype=torch.long, device=DEVICE), table[r * rows:(r + 1) * rows], r * rows,
                           ready_ptrs, torch.zeros(1, dtype=torch.int32, device=DEVICE), stride, r, world)
            gemv_push(zeros, w, ready_ptrs, torch.zeros(1, dtype=torch.int32, device=DEVICE), stride, r, world)
        pushed_add_rms_norm(zeros, norm_w, 1e-6, ready, torch.zeros(1, dtype=torch.int32, device=DEVICE), stride, world)
        torch.cuda.synchronize()
    for token in (1, rows + 2, rows * world - 1, rows * world + 3):  # ranks 0, 1, the last, none
        ids = torch.tensor([token], device=DEVICE)

        def call(r: int) -> tuple[torch.Tensor, ...]:
            share = embedding_push(ids, table[r * rows:(r + 1) * rows], r * rows, slot_ptrs, epochs[r], stride, r,
                                   world)
            out, res = pushed_add_rms_norm(zeros, norm_w, 1e-6, slots[r], epochs[r], stride, world)
            gemv_push(out, w, slot_ptrs, epochs[r], stride, r, world)
            return (share, out, res, *pushed_add_rms_norm(res, norm_w, 1e-6, slots[r], epochs[r], stride, world))
        outs = run_ranks(world, call)
        row = table[token:token + 1] if token < rows * world else zeros
        ref_out, ref_res = torch_ref.fused_add_rms_norm(row, zeros, norm_w, 1e-6)
        for r, (share, out, res, out2, res2) in enumerate(outs):
            owner = token // rows
            assert torch.equal(share.cpu(), (row if owner == r else zeros).cpu())
            assert torch.equal(res.cpu(), row.cpu())  # the sum of one row and zeros is exact
            torch.testing.assert_close(out.float().cpu(), ref_out.float().cpu(), atol=2e-3, rtol=2e-3)
            assert torch.equal(out2, outs[0][3]) and torch.equal(res2, outs[0][4])
        part = gemv(outs[0][1], w).float()  # every rank pushed the same GEMV of the same input
        total = sum(part for _ in range(world)).to(dt)
        ref_out2, ref_res2 = torch_ref.fused_add_rms_norm(total, outs[0][2], norm_w, 1e-6)
        assert torch.equal(outs[0][4].cpu(), ref_res2.cpu())
        torch.testing.assert_close(outs[0][3].float().cpu(), ref_out2.float().cpu(), atol=2e-2, rtol=2e-2)
    assert [e.item() for e in epochs] == [8] * world  # two pushes per token


@pytest.mark.parametrize("world", [2, 3])
def test_lm_head_push_then_pushed_gather_over_simulated_ranks(world: int) -> None:
    """A batch-1 step's end with `world` simulated ranks: the final norm receives a GEMV push (the
    epoch moves), then each rank's LM head pushes its vocab slice's logits into the logit slots and
    every rank gathers the same row: the ranks' GEMV outputs side by side, bit for bit. Twice, so both
    halves of the slots are used; the gather leaves the epoch where the norm put it."""
    from carpool.ops.triton.all_reduce_norm import pushed_add_rms_norm, pushed_gather
    from carpool.ops.triton.gemv import gemv, gemv_push

    dt = torch.float16 if INTERPRET else torch.bfloat16
    stride, shard, k = 32, 2 * 40, 24  # 40 pairs a rank: in programs of 16, the last partly masked
    gen = torch.Generator().manual_seed(30 + world)
    slots = [shared(torch.zeros(2 * world * stride, dtype=torch.int64, device=DEVICE)) for _ in range(world)]
    slot_ptrs = torch.tensor([t.data_ptr() for t in slots], dtype=torch.int64, device=DEVICE)
    logits = [shared(torch.zeros(2 * world * (shard // 2), dtype=torch.int64, device=DEVICE)) for _ in range(world)]
    logit_ptrs = torch.tensor([t.data_ptr() for t in logits], dtype=torch.int64, device=DEVICE)
    start = 2 ** 31 - 2  # the norm's advances and the gather's epoch + 1 wrap past the int32 limit
    epochs = [shared(torch.full((1,), start, dtype=torch.int32, device=DEVICE)) for _ in range(world)]
    heads = [(0.3 * torch.randn(shard, k, generator=gen)).to(DEVICE, dt) for _ in range(world)]
    w = (0.3 * torch.randn(k, k, generator=gen)).to(DEVICE, dt)
    norm_w = torch.rand(k, generator=gen).to(DEVICE, dt)
    residual = torch.randn(1, k, generator=gen).to(DEVICE, dt)
    if not INTERPRET:  # compile and load each rank's kernels alone first (see the tests above)
        ready = torch.full((2 * world * (shard // 2),), 1 << 32, dtype=torch.int64, device=DEVICE)
        ready_ptrs = torch.tensor([ready.data_ptr()] * world, device=DEVICE)
        for r in range(world):
            zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
            gemv_push(residual, w, ready_ptrs, zero, stride, r, world)
            gemv_push(residual, heads[r], ready_ptrs, zero, shard // 2, r, world)
        zero = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        pushed_add_rms_norm(residual, norm_w, 1e-6, ready, zero, stride, world)
        pushed_gather(ready, torch.zeros(1, dtype=torch.int32, device=DEVICE), shard // 2, world, shard, dt, 16)
        torch.cuda.synchronize()
    for round in range(2):
        x = torch.randn(1, k, generator=gen).to(DEVICE, dt)

        def call(r: int) -> tuple[torch.Tensor, ...]:
            y = gemv_push(x, w, slot_ptrs, epochs[r], stride, r, world)
            out, _ = pushed_add_rms_norm(y, norm_w, 1e-6, slots[r], epochs[r], stride, world)
            gemv_push(out, heads[r], logit_ptrs, epochs[r], shard // 2, r, world)
            return out, pushed_gather(logits[r], epochs[r], shard // 2, world, shard, dt, 16)
        outs = run_ranks(world, call)
        expected = torch.cat([gemv(outs[0][0], heads[r]) for r in range(world)], dim=-1)
        for out, gathered in outs:
            assert torch.equal(out, outs[0][0]) and torch.equal(gathered.cpu(), expected.cpu())
        wrapped = (start + round + 1 + 2 ** 31) % 2 ** 32 - 2 ** 31  # the norm's advance only (int32)
        assert [e.item() for e in epochs] == [wrapped] * world


def _simulated_push_communicator(rank: int = 0, logit_pairs: int = 0, gathered_by_nccl: list | None = None):
    """A Communicator for one simulated rank of two, over a one-rank push exchange (its slots are its own
    peers'): collectives are identities (the NCCL all-gather appends to gathered_by_nccl)."""
    from types import SimpleNamespace

    from carpool.distributed import Communicator, TPGroup
    from carpool.distributed.push_exchange import PushExchange

    class SimulatedGroup(TPGroup):
        def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
            if gathered_by_nccl is not None:
                gathered_by_nccl.append(x)
            return x

    slots = torch.zeros(2 * 64, dtype=torch.int64, device=DEVICE)
    push = PushExchange(slots, torch.tensor([slots.data_ptr()], device=DEVICE),
                        torch.zeros(1, dtype=torch.int32, device=DEVICE), 64, rank=0, world_size=1)
    if logit_pairs:
        logit_slots = torch.zeros(2 * logit_pairs, dtype=torch.int64, device=DEVICE)
        push.logit_slots, push.logit_ptrs = logit_slots, torch.tensor([logit_slots.data_ptr()], device=DEVICE)
        push.logit_shard = 2 * logit_pairs
    custom = SimpleNamespace(push=push, exchange=None, norm_eligible=lambda *a: False)
    return Communicator(SimulatedGroup(rank=rank, size=2, custom_all_reduce=custom)), push


def test_row_parallel_projection_pushes_to_the_norm_it_is_handed_to_on_batch_one_steps() -> None:
    """The model's wiring of the push exchange (one simulated rank in a group of two): a row-parallel
    projection without a bias pushes its one-row output as PartialSums, the norm call it is handed to
    receives it, and the result is the GEMV's then the fused add + norm's. Two rows or a 32-bit model take
    the plain path; a norm handed anything else than the push made last fails loudly, naming the rule."""
    from carpool.distributed import PartialSums
    from carpool.layers.linear import RowParallelLinear
    from carpool.layers.linear_method import UnquantizedLinearMethod
    from carpool.layers.norm import RMSNorm
    from carpool.ops import get_kernel_ops

    ops = get_kernel_ops("triton")
    dt = torch.float16 if INTERPRET else torch.bfloat16
    comm, push = _simulated_push_communicator()
    proj = RowParallelLinear(2 * 40, 48, dtype=dt, comm=comm, method=UnquantizedLinearMethod(gemv=tri.gemv)).to(DEVICE)
    proj.weight.data.copy_(torch.randn(48, 40))
    norm = RMSNorm(48, 1e-6, ops, dt).to(DEVICE)
    norm.weight.data.copy_(torch.rand(48))
    x, residual = torch.randn(1, 40, device=DEVICE).to(dt), torch.randn(1, 48, device=DEVICE).to(dt)
    for _ in range(3):  # both halves, then the first again
        y = proj(x)
        assert y.pushed and push.pending is y.value
        out, res = comm.reduce_add_rms_norm(y, residual, norm)
        assert push.pending is None
        ref_out, ref_res = tri.fused_add_rms_norm(tri.gemv(x, proj.weight), residual, norm.weight, 1e-6)
        assert torch.equal(res, ref_res)
        torch.testing.assert_close(out, ref_out, atol=1e-3, rtol=1e-3)
    assert push.epoch.item() == 3
    assert not proj(x.expand(2, 40).contiguous()).pushed  # two rows: the exchange path
    assert comm.push_gemv(x.float(), proj.weight.float()) is None  # 32-bit: no room for the flag
    y = proj(x)
    with pytest.raises(RuntimeError, match="only the partial sums pushed last"):
        comm.reduce_add_rms_norm(PartialSums(y.value.clone(), pushed=True), residual, norm)
    assert push.pending is None  # cleared: the next norm does not stay on the push path
    y = proj(x)
    with pytest.raises(RuntimeError, match="residual of shape"):  # it would wait for unwritten slots
        comm.reduce_add_rms_norm(y, residual[:, :32], norm)


def test_push_producers_refuse_what_their_words_cannot_carry() -> None:
    """The producers' checks before any launch: 16-bit outputs in pairs that fit the slots, and at most
    MAX_PUSH_WORLD ranks (push_targets loads every rank's slot address as one vector)."""
    from carpool.ops.triton.all_reduce_norm import embedding_push
    from carpool.ops.triton.gemv import gemv_push
    from carpool.ops.triton.push_words import MAX_PUSH_WORLD

    x, w = torch.zeros(1, 8, dtype=torch.float16), torch.zeros(6, 8, dtype=torch.float16)
    ptrs, epoch = torch.zeros(MAX_PUSH_WORLD + 1, dtype=torch.int64), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="world_size must be 1..8"):
        gemv_push(x, w, ptrs, epoch, 4, 0, MAX_PUSH_WORLD + 1)
    with pytest.raises(ValueError, match="even N"):
        gemv_push(x, w[:5], ptrs, epoch, 4, 0, 2)
    with pytest.raises(ValueError, match="even N <= 4"):  # 3 pairs, 2 slots
        gemv_push(x, w, ptrs, epoch, 2, 0, 2)
    with pytest.raises(ValueError, match="world_size must be 1..8"):
        embedding_push(torch.zeros(1, dtype=torch.long), w, 0, ptrs, epoch, 4, 0, MAX_PUSH_WORLD + 1)
    with pytest.raises(ValueError, match="one token"):
        embedding_push(torch.zeros(2, dtype=torch.long), w, 0, ptrs, epoch, 4, 0, 2)


def test_vocab_parallel_embedding_pushes_one_token_to_the_first_norm() -> None:
    """The embedding's wiring (rank 1 of two simulated, vocab slice [8, 16)): a one-token step returns
    this rank's share in flight, and the first norm (no residual yet) sums it with zeros, giving the row's
    norm and the row as the residual stream. Off (no zeros buffer), several tokens, or a pending push:
    the masked embedding as partial sums (reduced here by an identity all-reduce)."""
    from carpool.layers.embedding import VocabParallelEmbedding
    from carpool.layers.norm import RMSNorm
    from carpool.ops import get_kernel_ops

    dt = torch.float16 if INTERPRET else torch.bfloat16
    comm, push = _simulated_push_communicator(rank=1)
    embed = VocabParallelEmbedding(16, 48, dt, comm).to(DEVICE)
    embed.weight.data.copy_(torch.randn(8, 48))
    norm = RMSNorm(48, 1e-6, get_kernel_ops("triton"), dt).to(DEVICE)
    norm.weight.data.copy_(torch.rand(48))
    ids = torch.tensor([11], device=DEVICE)
    partial = embed(ids)
    assert not partial.pushed and torch.equal(partial.value, embed.weight[3:4])  # push off: the embedding itself
    push.zeros = torch.zeros(1, 64, dtype=dt, device=DEVICE)
    for token, row in ((11, embed.weight[3:4]), (2, torch.zeros(1, 48, dtype=dt, device=DEVICE))):
        partial = embed(torch.tensor([token], device=DEVICE))
        assert partial.pushed and push.pending is partial.value and torch.equal(partial.value, row)
        out, res = comm.reduce_add_rms_norm(partial, None, norm)
        assert push.pending is None and torch.equal(res, row)
        torch.testing.assert_close(out, get_kernel_ops("triton").rms_norm(row, norm.weight, 1e-6), atol=1e-3, rtol=1e-3)
    partial = embed(torch.tensor([11, 12], device=DEVICE))
    assert not partial.pushed and push.pending is None and torch.equal(partial.value, embed.weight[3:5])
    push.pending = partial.value  # a push not yet received: the embedding must not push over it
    assert not embed(ids).pushed
    assert push.epoch.item() == 2


def test_lm_head_gathers_its_logits_by_push_only_after_a_received_push() -> None:
    """The LM head's wiring (rank 0 of two simulated, a one-rank push exchange with logit slots): a
    one-row head gathers through the push only when the last exchange op of this forward was a norm
    receiving a push (else the gather's words could be the last step's) and then returns the GEMV's
    logits cut to the vocab; otherwise, and for two rows, it computes and all-gathers as usual."""
    from carpool.layers.embedding import ParallelLMHead
    from carpool.ops import get_kernel_ops

    gathered_by_nccl: list = []
    comm, push = _simulated_push_communicator(logit_pairs=40, gathered_by_nccl=gathered_by_nccl)
    dt = torch.float16 if INTERPRET else torch.bfloat16
    gemv = get_kernel_ops("triton").gemv
    head = ParallelLMHead(150, 32, dt, comm, gemv).to(DEVICE)  # 76 rows a rank (75, made even): not the slots' 80
    head.weight.data.copy_(torch.randn(76, 32))
    hidden = torch.randn(1, 32, device=DEVICE).to(dt)
    x, w = torch.randn(1, 16, device=DEVICE).to(dt), torch.randn(48, 16, device=DEVICE).to(dt)

    def receive_a_push() -> None:
        push.add_rms_norm(push.gemv(x, w), torch.zeros(1, 48, device=DEVICE, dtype=dt),
                          torch.ones(48, device=DEVICE, dtype=dt), 1e-6)

    receive_a_push()
    head.compute_logits(hidden)  # 76 rows: not the gather's width, all-gathered
    assert len(gathered_by_nccl) == 1 and push.received
    head = ParallelLMHead(160, 32, dt, comm, gemv).to(DEVICE)  # 80 rows a rank
    head.weight.data.copy_(torch.randn(80, 32))
    expected = gemv(hidden, head.weight)
    assert torch.equal(head.compute_logits(hidden), expected)  # pushed: the GEMV's logits, no all-gather
    assert len(gathered_by_nccl) == 1 and not push.received and push.epoch.item() == 1
    head.compute_logits(hidden)  # no push received since: the words in the slots are not new
    assert len(gathered_by_nccl) == 2
    receive_a_push()
    head.compute_logits(hidden.expand(2, 32).contiguous())  # two rows
    assert len(gathered_by_nccl) == 3 and push.received
    comm.begin_forward()  # a new forward (a graph replay may have gathered since): nothing received in it
    head.compute_logits(hidden)
    assert len(gathered_by_nccl) == 4
    receive_a_push()
    assert torch.equal(head.compute_logits(2 * hidden), gemv(2 * hidden, head.weight))
    assert len(gathered_by_nccl) == 4 and push.epoch.item() == 3


@pytest.mark.parametrize("arch,overrides,pushes_per_layer", [
    ("llama", {}, 2), ("llama", {"attention_bias": True}, 1),  # with an o_proj bias only down_proj pushes
    ("qwen2", {}, 2), ("qwen3", {}, 2)])
def test_every_model_family_receives_what_its_projections_push(checkpoint_factory, monkeypatch, arch: str,
                                                               overrides: dict, pushes_per_layer: int) -> None:
    """The engine as rank 0 of a simulated pair (collectives as identities, a one-rank push exchange): every
    batch-1 decode step pushes its embedding and each row-parallel projection's output without reduction,
    and a norm receives each push (else the next norm raises), so the epoch counts the pushes of every
    decode step."""
    from types import SimpleNamespace

    from carpool import LLM, SamplingParams
    from carpool.distributed import TPGroup
    from carpool.distributed.push_exchange import PushExchange
    from carpool.layers.embedding import vocab_shard_size
    from carpool.worker.model_runner import ModelRunner

    class RankZeroOfTwo(TPGroup):
        def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x], dim=-1)

    stride = 8192
    slots = torch.zeros(2 * stride, dtype=torch.int64, device=DEVICE)
    push = PushExchange(slots, torch.tensor([slots.data_ptr()], device=DEVICE),
                        torch.zeros(1, dtype=torch.int32, device=DEVICE), stride, rank=0, world_size=1)
    push.zeros = torch.zeros(1, 1024, dtype=torch.float16, device=DEVICE)  # the embedding pushes too
    tp = RankZeroOfTwo(0, 2, SimpleNamespace(push=push, exchange=None, norm_eligible=lambda *a: False))
    # and the LM head: a one-rank gather of this rank's slice, which the second rank would mirror
    # (the identity collectives' all-gather does the same)
    path = checkpoint_factory(arch, **overrides)
    with open(os.path.join(path, "config.json")) as f:
        shard = vocab_shard_size(json.load(f)["vocab_size"], 2)
    logit_slots = torch.zeros(2 * (shard // 2), dtype=torch.int64, device=DEVICE)
    push.logit_slots, push.logit_ptrs, push.logit_shard = (
        logit_slots, torch.tensor([logit_slots.data_ptr()], device=DEVICE), shard)
    real_gather, gathers = PushExchange.gather_logits, []

    def gather_as_two_ranks(self, hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor | None:
        logits = real_gather(self, hidden, weight, vocab)
        gathers.append(logits is not None)
        return None if logits is None else torch.cat([logits, logits], dim=-1)[..., :vocab]
    monkeypatch.setattr(PushExchange, "gather_logits", gather_as_two_ranks)
    real_init = ModelRunner.__init__
    monkeypatch.setattr(ModelRunner, "__init__", lambda self, config, *a, **k: real_init(self, config, tp))
    llm = LLM(path, device=DEVICE, kernel_backend="triton", dtype="float16",
              enforce_eager=True)
    out = llm.generate([{"prompt_token_ids": [5]}], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and push.pending is None
    layers = llm.engine.config.model.num_hidden_layers
    # a one-token prefill and two decode steps, each pushing its embedding and every layer's outputs,
    # and gathering its logits by push
    assert push.epoch.item() == 3 * (pushes_per_layer * layers + 1)
    assert gathers == [True] * 3 and not push.received
