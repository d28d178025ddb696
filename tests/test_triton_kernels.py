"""Triton kernels against their torch_ref twins.

Without a GPU they run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in
float32 (and float16; bf16 `tl.dot` is wrong in the interpreter); with a GPU the same unmarked tests run
compiled in float32, and the `gpu` tests compare bf16 kernels with torch_ref on upcast float32 inputs.
Outputs are allocated poisoned with NaN, so a kernel that skips an element fails.
"""

from __future__ import annotations

import json
import os
import multiprocessing
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from triton import cdiv  # noqa: E402

from carpool.forward_batch import AttentionMetadata, TritonAttentionMetadata  # noqa: E402
from carpool.ops import torch_ref  # noqa: E402
from carpool.ops import triton as tri  # noqa: E402
from carpool.ops.triton import utils  # noqa: E402
from carpool.ops.triton.attention import (DECODE_TARGET_ITEMS, MIN_TOKENS_PER_SPLIT,  # noqa: E402
                                          ORDER_MAX_SPLITS, balanced_decode_plan,
                                          decode_num_splits)
from carpool.ops.triton.decode_attention import DecodeConfig, decode_attention  # noqa: E402
from carpool.ops.triton.paged_kv import store_kvcache  # noqa: E402
from carpool.ops.triton.prefill_attention import PrefillConfig, prefill_attention  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
gpu = pytest.mark.gpu
# Idle decode splits compute log2(0) = -inf on purpose; numpy warns about it in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")
# A CPU engine with the Triton backend: its kernels run only through the interpreter.
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="a CPU engine's Triton kernels need the interpreter")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(utils, "empty_output", poisoned)


def make_batch(reqs: list[tuple[int, int]], num_q_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: str = DEVICE, pad_tokens: int = 0,
               seed: int = 0):
    """Random q/k/v and a random cache for requests given as (seq_len, q_len).

    Each request gets distinct, shuffled blocks; its cached prefix holds random K/V already, and its
    q_len new tokens are stored by the op through slot_mapping. `pad_tokens` extra rows at the end
    belong to no request and carry slot -1."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [cdiv(s, block_size) for s, _ in reqs]
    num_blocks = sum(blocks_per_req) + 3
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_req + [1])
    block_tables = torch.zeros(len(reqs), max_blocks, dtype=torch.int32)
    slots: list[int] = []
    qsl = [0]
    for i, ((seq_len, q_len), nb) in enumerate(zip(reqs, blocks_per_req)):
        table = [ids.pop() for _ in range(nb)]
        block_tables[i, :nb] = torch.tensor(table, dtype=torch.int32)
        for pos in range(seq_len - q_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + q_len)
    slots += [-1] * pad_tokens
    n = len(slots)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    q, k, v = rand(n, num_q_heads, head_dim), rand(n, num_kv_heads, head_dim), rand(n, num_kv_heads, head_dim)
    k_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = rand(num_blocks, block_size, num_kv_heads, head_dim)
    seq_lens = [s for s, _ in reqs]
    meta = TritonAttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(q for _, q in reqs), max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    return q, k, v, k_cache, v_cache, meta


def check_attention(reqs: list[tuple[int, int]], num_q_heads: int, num_kv_heads: int, head_dim: int,
                    block_size: int = 16, dtype: torch.dtype = torch.float32, pad_tokens: int = 0,
                    num_splits: int | None = None, atol: float = 2e-5, rtol: float = 1e-4,
                    device: str = DEVICE) -> None:
    q, k, v, kc, vc, meta = make_batch(reqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype,
                                       device, pad_tokens)
    if num_splits is not None:
        meta.num_splits = num_splits
    scale = head_dim ** -0.5
    kc_ref, vc_ref = kc.float().clone(), vc.float().clone()
    expected = torch_ref.paged_attention(q.float(), k.float(), v.float(), kc_ref, vc_ref, meta, scale)
    out = tri.paged_attention(q, k, v, kc, vc, meta, scale)
    n = meta.query_start_loc_cpu[-1]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not out[:n].isnan().any(), "some output elements were never written"
    torch.testing.assert_close(out[:n].float(), expected[:n], atol=atol, rtol=rtol)
    # The store: new tokens land in their slots, padding (slot -1) writes nothing.
    torch.testing.assert_close(kc.float(), kc_ref, atol=0, rtol=0)
    torch.testing.assert_close(vc.float(), vc_ref, atol=0, rtol=0)


# ---- decode path (max_query_len == 1) -------------------------------------------------------------

@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (2, 24, 32), (4, 128, 16), (2, 16, 16)])
def test_decode_matches_reference(group: int, head_dim: int, block_size: int) -> None:
    contexts = [1, 17, 64, 100, 333]
    check_attention([(s, 1) for s in contexts], 2 * group, 2, head_dim, block_size)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_splits_merge_to_the_same_result(num_splits: int) -> None:
    # 8 splits over <= 6 tiles: some splits idle, and the 1-token context uses one split only.
    check_attention([(1, 1), (129, 1), (330, 1)], 4, 2, 32, num_splits=num_splits)


def test_decode_skips_padding_slots_and_empty_requests() -> None:
    # Request 1 schedules no token (q_len 0); two trailing rows carry slot -1.
    check_attention([(40, 1), (25, 0), (70, 1)], 4, 1, 64, pad_tokens=2, num_splits=4)


def test_decode_float16() -> None:
    check_attention([(5, 1), (200, 1)], 4, 2, 64, dtype=torch.float16, num_splits=2, atol=2e-3, rtol=2e-3)


def test_decode_uses_scratch_from_meta() -> None:
    # long enough for all 3 splits: a request with one split would write `out` directly
    q, k, v, kc, vc, meta = make_batch([(300, 1), (400, 1)], 2, 1, 32, 16, torch.float32)
    part_out = torch.full((8, 2, 16, 32), float("nan"), device=DEVICE)  # larger than needed
    part_lse = torch.full((8, 2, 16), float("nan"), device=DEVICE)
    meta.num_splits, meta.decode_scratch = 3, (part_out, part_lse)
    expected = torch_ref.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.2)
    out = tri.paged_attention(q, k, v, kc, vc, meta, 0.2)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert not part_out[:2, :, :3].isnan().any()


def test_decode_grid_ignores_host_lengths() -> None:
    """What a CUDA graph replays: the same launch with new seq_lens on the device gives new results."""
    q, _, _, kc, vc, meta = make_batch([(300, 1), (40, 1)], 4, 2, 32, 16, torch.float32)
    out = torch.full_like(q, float("nan"))
    meta.seq_lens.copy_(torch.tensor([35, 290], dtype=torch.int32))  # the host copies are stale now
    decode_attention(q, kc, vc, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.3, 4)
    meta.seq_lens_cpu = [35, 290]
    torch.testing.assert_close(out, attention_without_store(q, kc, vc, meta, 0.3), atol=2e-5, rtol=1e-4)


def attention_without_store(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata,
                            scale: float) -> torch.Tensor:
    """torch_ref attention over the cache as it is (no new K/V stored)."""
    no_kv = torch.empty(0, kc.shape[2], kc.shape[3], dtype=q.dtype, device=q.device)
    no_store = AttentionMetadata(meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                 torch.empty(0, dtype=torch.int64, device=q.device), meta.max_query_len,
                                 meta.max_seq_len, meta.query_start_loc_cpu, meta.seq_lens_cpu)
    return torch_ref.paged_attention(q, no_kv, no_kv, kc.clone(), vc.clone(), no_store, scale)


@pytest.mark.parametrize("group,prefix_len,num_splits,block_size", [
    (2, 64, 1, 16), (4, 128, 3, 16), (1, 64, 2, 32), (2, 0, 1, 16)])
def test_cascade_decode_over_a_shared_prefix_matches_reference(group: int, prefix_len: int, num_splits: int,
                                                                block_size: int) -> None:
    """Every request's first prefix_len keys sit in the same blocks (a prefix-cache hit); the prefix kernel
    reads them once for the batch, the split kernel covers the rest, the merge joins both."""
    contexts = [129, 200, 150, 333, 130]
    q, k, v, kc, vc, meta = make_batch([(c, 1) for c in contexts], 2 * group, 2, 32, block_size, torch.float32)
    shared = prefix_len // block_size
    meta.block_tables[:, :shared] = meta.block_tables[0, :shared]
    meta.num_splits = num_splits
    meta.cascade_prefix_len = torch.tensor([prefix_len], dtype=torch.int32, device=DEVICE)
    expected = torch_ref.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.3)
    out = tri.paged_attention(q, k, v, kc, vc, meta, 0.3)
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_split_table_gives_few_reqs_many_splits() -> None:
    assert decode_num_splits(1, 8) > decode_num_splits(64, 8) >= decode_num_splits(256, 8) == 1
    assert decode_num_splits(1, 8, max_seq_len=100) == 1  # a short context is not split


@pytest.mark.parametrize("group", [1, 4])
def test_balanced_decode_matches_reference_and_idle_splits_write_nothing(group: int) -> None:
    """Mixed contexts in a permuted order, each request with its own split count (1 for the short ones,
    which write `out` directly); out and scratch start as NaN, so any read of an unwritten slot shows."""
    contexts = [1, 40, 1000, 77, 130, 64, 5, 260]
    q, _, _, kc, vc, meta = make_batch([(c, 1) for c in contexts], 2 * group, 2, 32, 16, torch.float32)
    num_splits, split_len, block_n = 4, 64, 32  # 2 tiles per split; the 1000-key request is capped at 4
    config = DecodeConfig(block_n=block_n, num_stages=1)
    order = torch.tensor([3, 0, 7, 2, 5, 1, 6, 4], dtype=torch.int32, device=DEVICE)
    part_out = torch.full((len(contexts), 2 * group, num_splits, 32), float("nan"), device=DEVICE)
    part_lse = torch.full((len(contexts), 2 * group, num_splits), float("nan"), device=DEVICE)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kc, vc, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.3, num_splits,
                     config, (part_out, part_lse), order=order,
                     split_len=torch.tensor([split_len], dtype=torch.int32, device=DEVICE))
    assert not out.isnan().any()
    torch.testing.assert_close(out, attention_without_store(q, kc, vc, meta, 0.3), atol=2e-5, rtol=1e-4)
    used = [min(num_splits, max(1, cdiv(cdiv(c, block_n), cdiv(split_len, block_n)))) for c in contexts]
    assert used[0] == 1 and used[2] == num_splits and 1 < used[4] < num_splits  # all three kinds present
    for r, u in enumerate(used):
        num_parts = 0 if u == 1 else u  # one split writes `out` and no partial; splits >= used write nothing
        for scratch in (part_lse, part_out):
            assert not scratch[r, :, :num_parts].isnan().any() and scratch[r, :, num_parts:].isnan().all()


def test_balanced_plan_orders_longest_first_and_sizes_splits() -> None:
    rng = random.Random(0)
    for num_reqs in (1, 7, 33, 64, 256):
        lens = [rng.randint(1, 3000) for _ in range(num_reqs)] + [0, 0]  # two requests the kernel skips
        plan = balanced_decode_plan(lens, 8)
        assert plan.num_splits == decode_num_splits(len(lens), 8)
        assert sorted(plan.order.tolist()) == list(range(len(lens))) and plan.order.dtype == np.int32
        ordered = [lens[i] for i in plan.order]
        if plan.num_splits > ORDER_MAX_SPLITS:  # many splits: batch order, one-tile splits
            assert ordered == lens and plan.split_len == 1
            continue
        assert ordered == sorted(lens, reverse=True)  # longest first
        assert plan.split_len >= MIN_TOKENS_PER_SPLIT
        # the keys of all heads fit in target_items splits of split_len, and no shorter split_len does that
        assert 8 * sum(lens) <= plan.split_len * DECODE_TARGET_ITEMS
        assert plan.split_len == MIN_TOKENS_PER_SPLIT or 8 * sum(lens) > (plan.split_len - 1) * DECODE_TARGET_ITEMS
        assert balanced_decode_plan(lens, 8, num_splits=2).num_splits == 2  # a graph's grid wins
    assert balanced_decode_plan([100] * 40, 8).split_len == MIN_TOKENS_PER_SPLIT  # no split under the minimum
    assert [decode_num_splits(n, 8) for n in (1, 4, 16, 32, 64, 65, 256)] == [32, 16, 8, 4, 2, 1, 1]


@pytest.mark.parametrize("kernel_io", [False, True])
def test_graph_runner_uploads_each_replay_with_plan_longest_first_and_padding_last(monkeypatch,
                                                                                  kernel_io: bool) -> None:
    """What a captured graph reads from its static buffers, refilled before each replay from one of two
    host mirrors in turn (by one copy, or with kernel_io by one kernel that reads the mirror itself): the
    step's rows, padding rows that attend one key and store nothing, the decode plan (longest request
    first, padding last), and the tokens the previous step sampled, which only the device holds (the
    fix-up). Replays are faked: the buffers are checked at each replay, through steps of different
    sizes so each mirror is reused with other row counts (and, with kernel_io, by the kernel for small
    steps and the copy for large ones in turn)."""
    from types import SimpleNamespace

    from carpool.ops.triton import host_io
    from carpool.worker.cuda_graph import HOST_IO_MAX_ROWS, HOST_IO_MAX_TABLE_WORDS

    from carpool.attention.triton_paged import TritonAttentionBackend
    from carpool.worker.cuda_graph import CUDAGraphRunner
    from carpool.worker.input_batch import PendingFixup, StepInputs

    model = SimpleNamespace(attention_layers=lambda: [SimpleNamespace(num_kv_heads=8)])
    backend = TritonAttentionBackend()
    runner = CUDAGraphRunner(model, backend, 64, 65536, 16, torch.device(DEVICE), kernel_io=kernel_io)  # type: ignore[arg-type]
    splits = backend._decode_splits
    assert splits[1] == 32 and splits[48] == 2 and splits[64] == 2
    seen: list[dict] = []
    for bs in runner.batch_sizes:
        runner.graphs[(bs, False)] = SimpleNamespace(replay=lambda: seen.append(
            {**{name: t.to("cpu", copy=True) for name, t in runner.staged.tensors.items()},
             "block_tables": runner.block_tables.to("cpu", copy=True)}))
        runner.logits[(bs, False)] = torch.zeros(bs, 5)

    def step(lens: list[int], width: int, salt: int) -> StepInputs:
        n = len(lens)
        return StepInputs(rows=np.arange(n), input_ids=np.arange(n, dtype=np.int64) + salt,
                          positions=np.array(lens, dtype=np.int64) - 1, slot_mapping=np.arange(n, dtype=np.int64) * 7 + salt,
                          query_start_loc=np.arange(n + 1, dtype=np.int32), seq_lens=np.array(lens, dtype=np.int32),
                          block_tables=np.arange(n * width, dtype=np.int32).reshape(n, width) + salt,
                          sample_rows=np.arange(n), logits_indices=np.arange(n, dtype=np.int64), max_query_len=1,
                          max_seq_len=max(lens), pending_token_index=np.zeros(0, dtype=np.int64),
                          pending_rows=np.zeros(0, dtype=np.int64))

    # (the third step reuses the first one's mirror: its padding row 3 held a real row there). Fix-ups:
    # input rows -> the previous step's sampled tokens (device values), in and out of order, or none.
    cases = [([300, 1000] + [100] * 45, 63, 100, [3, 0, 46]), ([5, 9], 1, 200, [0, 1]), ([8] * 3, 1, 300, []),
             ([40] * 16 + [700] * 31, 44, 400, [5]), ([7, 300, 20], 19, 500, [2, 0]),
             ([64] * 5, 4, 600, [4, 1, 3]), ([33] * 9, 3, 700, [8]), ([10] * 2, 3000, 800, [1])]
    if kernel_io:
        runner._compile_host_io()  # (start-up: both kernel variants once, before any step)
    staged_by_kernel = []
    real_stage = host_io.stage_inputs
    monkeypatch.setattr(host_io, "stage_inputs", lambda *a: staged_by_kernel.append(1) or real_stage(*a))
    for lens, width, salt, fix_rows in cases:
        inputs = step(lens, width, salt)
        values = torch.arange(len(fix_rows), dtype=torch.int64, device=DEVICE) * 11 + 5000 + salt
        runner.run(inputs, PendingFixup(np.array(fix_rows, dtype=np.int64), values) if fix_rows else None)
        got, b = seen[-1], len(lens)
        bs = next(s for s in runner.batch_sizes if s >= b)
        expected_ids = inputs.input_ids.copy()
        expected_ids[fix_rows] = values.cpu().numpy()
        assert got["input_ids"][:b].tolist() == expected_ids.tolist()
        for name in ("positions", "slot_mapping", "seq_lens"):
            assert got[name][:b].tolist() == getattr(inputs, name).tolist(), name
        assert torch.equal(got["block_tables"][:b, :width], torch.from_numpy(inputs.block_tables))
        assert (got["slot_mapping"][b:bs] == -1).all() and (got["seq_lens"][b:bs] == 1).all()
        assert (got["block_tables"][b:bs, 0] == 0).all()
        plan = balanced_decode_plan(inputs.seq_lens, 8, splits[bs])
        assert got["decode_order"][:bs].tolist() == plan.order.tolist() + list(range(b, bs))
        assert got["decode_split_len"].item() == plan.split_len
    # (small: few rows and block tables of at most HOST_IO_MAX_TABLE_WORDS; the last case has long ones)
    small = sum(1 for lens, width, *_ in cases if (bs := next(s for s in runner.batch_sizes if s >= len(lens)))
                <= HOST_IO_MAX_ROWS and bs * width <= HOST_IO_MAX_TABLE_WORDS)
    assert len(staged_by_kernel) == (small if kernel_io else 0) and 0 < small < len(cases)
    assert seen[0]["decode_order"][:2].tolist() == [1, 0]  # longest first
    assert seen[0]["decode_split_len"].item() >= MIN_TOKENS_PER_SPLIT
    assert seen[1]["decode_split_len"].item() == 1  # many splits: batch order, one-tile splits


def test_static_inputs_upload_a_prefix_from_alternating_mirrors() -> None:
    from carpool.worker.staging import Field, StaticInputs

    staged = StaticInputs([Field("a", torch.long, (3,), -1), Field("rows", torch.int32, (4, 5), 0)],
                          torch.device("cpu"))
    assert staged.tensors["a"].tolist() == [-1, -1, -1] and staged.end_of("rows", 2) == 32 + 2 * 20
    host = staged.host()
    host["a"][:] = [1, 2, 3]
    host["rows"][:] = 9
    staged.upload(staged.end_of("rows", 2))  # the first two rows only
    assert staged.tensors["a"].tolist() == [1, 2, 3]
    assert staged.tensors["rows"][:, 0].tolist() == [9, 9, 0, 0]
    host2 = staged.host()  # the other mirror: still the initial values
    assert host2["a"].tolist() == [-1, -1, -1] and staged.host() is host2
    staged.upload()
    assert staged.tensors["a"].tolist() == [-1, -1, -1] and staged.host() is host


def test_copy_to_host_and_stage_inputs_read_and_write_where_told() -> None:
    """The host_io kernels (their host side in pinned memory on a GPU): a plain copy, and the staging of
    a replay's inputs: ids with the fix-up applied, a word range copied and nothing outside it, packed
    block tables spread into their wider home and nothing else of it touched."""
    from carpool.ops.triton.host_io import copy_to_host, stage_inputs

    def host(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if DEVICE == "cuda" else t

    src = torch.arange(7, dtype=torch.int64, device=DEVICE) * 3
    dst = host(torch.full((7,), -1, dtype=torch.int64))
    copy_to_host(src, dst)
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # (the host reads what a kernel wrote)
    assert dst.tolist() == src.tolist()
    with pytest.raises(ValueError, match="copy_to_host"):
        copy_to_host(src, host(torch.empty(6, dtype=torch.int64)))

    host_ids = host(torch.tensor([10, 11, 12, 13], dtype=torch.int64))
    ids = torch.full((6,), -1, dtype=torch.int64, device=DEVICE)
    source = host(torch.tensor([-1, 1, -1, 0], dtype=torch.int32))
    values = torch.tensor([900, 901], dtype=torch.int64, device=DEVICE)
    host_words = host(torch.arange(20, dtype=torch.int32) + 100)
    words = torch.zeros(20, dtype=torch.int32, device=DEVICE)
    host_tables = host(torch.arange(6, dtype=torch.int32).view(2, 3) + 50)
    tables = torch.full((4, 5), -7, dtype=torch.int32, device=DEVICE)
    stage_inputs(host_ids, ids, source, values, host_words, words, 4, 9, host_tables, tables)
    assert ids.tolist() == [10, 901, 12, 900, -1, -1]
    assert words.tolist() == [0] * 4 + list(range(104, 109)) + [0] * 11
    assert tables[:2, :3].tolist() == host_tables.tolist()
    assert (tables[2:] == -7).all() and (tables[:, 3:] == -7).all()
    stage_inputs(host_ids, ids, None, None, host_words, words, 0, 0, host(host_tables[:1, :2].contiguous()), tables)
    assert ids[:4].tolist() == host_ids.tolist()  # (no fix-up)
    with pytest.raises(ValueError, match="stage_inputs"):
        stage_inputs(host_ids, ids, None, None, host_words, words, 0, 0, host(torch.zeros(5, 3, dtype=torch.int32)),
                     tables)
    with pytest.raises(ValueError, match="together"):
        stage_inputs(host_ids, ids, source, None, host_words, words, 0, 0, host_tables, tables)
    with pytest.raises(ValueError, match="word range"):
        stage_inputs(host_ids, ids, None, None, host_words, words, 4, 21, host_tables, tables)


# ---- prefill / extend path ------------------------------------------------------------------------

@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (2, 16, 32), (4, 24, 16), (2, 128, 16)])
def test_prefill_matches_reference(group: int, head_dim: int, block_size: int) -> None:
    check_attention([(1, 1), (37, 37), (130, 130)], 2 * group, 2, head_dim, block_size)


@pytest.mark.parametrize("group", [1, 4])
def test_prefill_with_cached_prefix(group: int) -> None:
    # (seq_len, q_len): chunks that start mid-page, at a page boundary, and a long prefix.
    check_attention([(300, 45), (64, 48), (77, 5), (200, 128)], 2 * group, 2, 32, block_size=16)


@pytest.mark.parametrize("block_size", [32, 128])
def test_mixed_batch_of_decodes_chunks_and_prefix_hits(block_size: int) -> None:
    reqs = [(120, 1), (9, 1), (260, 1), (50, 50), (180, 70), (33, 2)]
    check_attention(reqs, 4, 2, 64, block_size=block_size, pad_tokens=3)


def test_metadata_refilled_for_the_next_step_gets_a_fresh_plan() -> None:
    q, k, v, kc, vc, meta = make_batch([(40, 40), (90, 1), (70, 30)], 4, 2, 32, 16, torch.float32)
    tri.paged_attention(q, k, v, kc, vc, meta, 0.25)  # caches this step's plans in meta.step_plans
    q2, k2, v2, kc2, vc2, meta2 = make_batch([(33, 1), (100, 64)], 4, 2, 32, 16, torch.float32, seed=1)
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping", "max_query_len",
                 "max_seq_len", "query_start_loc_cpu", "seq_lens_cpu"):
        setattr(meta, name, getattr(meta2, name))  # the same object, refilled; meta.step_plans kept
    expected = torch_ref.paged_attention(q2, k2, v2, kc2.clone(), vc2.clone(), meta2, 0.25)
    torch.testing.assert_close(tri.paged_attention(q2, k2, v2, kc2, vc2, meta, 0.25), expected,
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [PrefillConfig(block_m=128, block_n=64),
                                    PrefillConfig(block_m=16, block_n=16)])
def test_prefill_kernel_alone_handles_single_queries(config: PrefillConfig) -> None:
    # Without the decode kernel: 1-query requests go through the prefill kernel as 1-row tiles.
    q, k, v, kc, vc, meta = make_batch([(120, 1), (70, 70), (200, 33), (5, 1)], 4, 2, 32, 16, torch.float32)
    expected = torch_ref.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.25)
    store_kvcache(k, v, kc, vc, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kc, vc, out, meta, 0.25, skip_single_queries=False, config=config)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [DecodeConfig(block_n=64), DecodeConfig(block_n=16, min_split_tiles=2)])
def test_decode_kernel_configs(config: DecodeConfig) -> None:
    q, _, _, kc, vc, meta = make_batch([(300, 1), (1, 1), (77, 1)], 8, 2, 32, 16, torch.float32)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kc, vc, out, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.3, 5, config)
    torch.testing.assert_close(out, attention_without_store(q, kc, vc, meta, 0.3), atol=2e-5, rtol=1e-4)


def test_prefill_float16() -> None:
    check_attention([(90, 90), (150, 40)], 4, 2, 64, dtype=torch.float16, atol=2e-3, rtol=2e-3)


# ---- elementwise ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_rms_norm_on_strided_heads(dtype: torch.dtype, tol: float) -> None:
    base = torch.randn(7, 5 * 24, device=DEVICE).to(dtype)
    x = base[:, :3 * 24].view(7, 3, 24)  # like q inside a fused qkv row: strided rows
    w = torch.randn(24, device=DEVICE).to(dtype)
    torch.testing.assert_close(tri.rms_norm(x, w, 1e-6), torch_ref.rms_norm(x, w, 1e-6), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_fused_add_rms_norm(dtype: torch.dtype, tol: float) -> None:
    x, r = (torch.randn(5, 100, device=DEVICE).to(dtype) for _ in range(2))
    w = torch.randn(100, device=DEVICE).to(dtype)
    x0, r0 = x.clone(), r.clone()
    out, res = tri.fused_add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = torch_ref.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched


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
    max_programs = MAX_PROGRAMS if INTERPRET else min(MAX_PROGRAMS, torch.cuda.get_device_properties(0).multi_processor_count)
    if not INTERPRET:
        # Compile and load every rank's kernel first, alone, against pads that read as already signalled:
        # a first launch loads its module, which waits for the running kernels, so a rank spinning on
        # the same GPU would wait forever for a peer whose kernel cannot load.
        ready = torch.full((MAX_PROGRAMS * world,), 1 << 30, dtype=torch.int32, device=DEVICE)
        scratch = torch.empty(2 * half, device=DEVICE)
        for r in range(world):
            all_reduce_add_rms_norm(w[None], w[None], w, 1e-6, torch.tensor([scratch.data_ptr()] * world, device=DEVICE),
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
            share = embedding_push(ids, table[r * rows:(r + 1) * rows], r * rows, slot_ptrs, epochs[r], stride, r, world)
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
    from carpool.ops.triton.all_reduce_norm import MAX_PUSH_WORLD, embedding_push
    from carpool.ops.triton.gemv import gemv_push

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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_silu_and_mul(dtype: torch.dtype, tol: float) -> None:
    x = (3 * torch.randn(4, 3, 2 * 1500, device=DEVICE)).to(dtype)  # d = 1500: two column tiles
    torch.testing.assert_close(tri.silu_and_mul(x), torch_ref.silu_and_mul(x), atol=tol, rtol=tol)


@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("head_dim", [24, 64])
def test_rope_and_store_kv_rotates_q_and_caches_rotated_k_and_v(head_dim: int, with_norm: bool) -> None:
    t, hq, hkv, page, blocks = 6, 4, 2, 4, 5
    qkv = 3 * torch.randn(t, (hq + 2 * hkv) * head_dim, device=DEVICE)
    q = qkv[:, :hq * head_dim].view(t, hq, head_dim)
    k = qkv[:, hq * head_dim:(hq + hkv) * head_dim].view(t, hkv, head_dim)
    v = qkv[:, (hq + hkv) * head_dim:].view(t, hkv, head_dim)
    cos_sin = torch.randn(50, head_dim, device=DEVICE)
    positions = torch.tensor([0, 3, 49, 7, 7, 20], device=DEVICE)
    slots = torch.tensor([5, -1, 19, 0, 12, 7], device=DEVICE)  # one padding token
    weights = ((torch.rand(head_dim, device=DEVICE) + 0.5, torch.rand(head_dim, device=DEVICE) + 0.5, 1e-6)
               if with_norm else (None, None, 0.0))
    caches = [torch.full((blocks, page, hkv, head_dim), 7.0, device=DEVICE) for _ in range(4)]
    ref_q = torch_ref.rope_and_store_kv(positions, q.clone(), k.clone(), v, cos_sin, caches[0], caches[1],
                                        slots, *weights)
    k_before, v_before = k.clone(), v.clone()
    out_q = tri.rope_and_store_kv(positions, q, k, v, cos_sin, caches[2], caches[3], slots, *weights)
    assert out_q.data_ptr() == qkv.data_ptr()  # in place on the view of the qkv projection
    torch.testing.assert_close(out_q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[2], caches[0], atol=1e-5, rtol=1e-5)  # untouched slots stay 7
    torch.testing.assert_close(caches[3], caches[1], atol=0, rtol=0)
    assert torch.equal(k, k_before)  # only its rotated copy in the cache changes
    assert torch.equal(v, v_before)


def test_paged_attention_after_rope_and_store_kv_equals_storing_inside() -> None:
    reqs = [(9, 9), (17, 1), (5, 2)]
    q, k, v, kc, vc, meta = make_batch(reqs, 4, 2, 32, 4, torch.float32, seed=3)
    expected = tri.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.3)
    store_kvcache(k, v, kc, vc, meta.slot_mapping)
    torch.testing.assert_close(tri.paged_attention(q, None, None, kc, vc, meta, 0.3), expected,
                               atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="both"):
        tri.paged_attention(q, k, None, kc, vc, meta, 0.3)


@pytest.mark.parametrize("n,k,with_bias", [(10, 70, False), (33, 2100, True)])  # ragged row and column tiles
def test_gemv_matches_linear(n: int, k: int, with_bias: bool) -> None:
    from carpool.ops.triton.gemv import GemvConfig, gemv

    w = torch.randn(n, k, device=DEVICE)
    x = torch.randn(1, k, device=DEVICE)
    b = torch.randn(n, device=DEVICE) if with_bias else None
    expected = torch.nn.functional.linear(x, w, b)
    for config in (None, GemvConfig(), GemvConfig(block_n=8, block_k=256)):  # None: the default (whole rows)
        torch.testing.assert_close(gemv(x, w, b, config), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("d,k", [(5, 70), (17, 2100)])  # ragged rows and column tiles; K over one tile
def test_gemv_silu_and_mul_equals_gemv_then_silu_and_mul(d: int, k: int) -> None:
    from carpool.ops.triton.gemv import GemvConfig, gemv, gemv_silu_and_mul

    w = 0.05 * torch.randn(2 * d, k, device=DEVICE)  # gate values of a few units: no exp overflow
    x = torch.randn(1, k, device=DEVICE)
    gate, up = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
    torch.testing.assert_close(gemv_silu_and_mul(x, w), torch.nn.functional.silu(gate) * up,
                               atol=1e-4, rtol=1e-4)
    for config in (None, GemvConfig(block_k=256)):  # the same roundings as the two kernels: equal bits
        assert torch.equal(gemv_silu_and_mul(x, w, config), tri.silu_and_mul(gemv(x, w, config=config)))
    with pytest.raises(ValueError, match="gate and up"):
        gemv_silu_and_mul(x, w[1:])


def _qkv_rope_case(hq: int, hkv: int, head_dim: int, k: int, dtype: torch.dtype, with_bias: bool, device: str):
    w = 0.1 * torch.randn((hq + 2 * hkv) * head_dim, k, device=device).to(dtype)
    x = torch.randn(1, k, device=device).to(dtype)
    b = torch.randn(w.shape[0], device=device).to(dtype) if with_bias else None
    cos_sin = torch.randn(50, head_dim, device=device)  # float32, as RotaryEmbedding keeps it
    caches = [torch.full((5, 4, hkv, head_dim), 7.0, device=device).to(dtype) for _ in range(4)]
    return w, x, b, cos_sin, caches


@pytest.mark.parametrize("hq,hkv,head_dim,with_bias", [(4, 2, 16, False), (3, 1, 24, True)])
def test_gemv_rope_and_store_kv_equals_gemv_then_rope_and_store_kv(hq, hkv, head_dim, with_bias) -> None:
    from carpool.ops.triton.gemv import gemv, gemv_rope_and_store_kv

    w, x, b, cos_sin, caches = _qkv_rope_case(hq, hkv, head_dim, 70, torch.float32, with_bias, DEVICE)
    for pos, slot in ((0, 5), (49, 19), (7, -1)):  # the last: a padded step stores nothing
        positions = torch.tensor([pos], device=DEVICE)
        slots = torch.tensor([slot], device=DEVICE)
        qkv = gemv(x, w, b)
        q = qkv[:, :hq * head_dim].view(1, hq, head_dim)
        k = qkv[:, hq * head_dim:(hq + hkv) * head_dim].view(1, hkv, head_dim)
        v = qkv[:, (hq + hkv) * head_dim:].view(1, hkv, head_dim)
        expected = tri.rope_and_store_kv(positions, q, k, v, cos_sin, caches[0], caches[1], slots).clone()
        got = gemv_rope_and_store_kv(x, w, b, positions, cos_sin, caches[2], caches[3], slots, hq, hkv)
        assert got.shape == (1, hq, head_dim)
        assert torch.equal(got, expected)  # the same roundings: equal bits
        assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert (caches[2] == 7.0).sum() == caches[2].numel() - 2 * hkv * head_dim  # two slots written
    with pytest.raises(ValueError, match="gemv_rope_and_store_kv"):
        gemv_rope_and_store_kv(x, w[2:], b, positions, cos_sin, caches[2], caches[3], slots, hq, hkv)
    with pytest.raises(ValueError, match="float32 cos_sin_cache"):
        gemv_rope_and_store_kv(x, w, b, positions, cos_sin.half(), caches[2], caches[3], slots, hq, hkv)


# ---- in the model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # head_dim 16; head_dim 24 with q/k norms on views
def test_engine_with_triton_kernels_gives_the_same_greedy_tokens(checkpoint_factory, arch: str) -> None:
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams

    path = checkpoint_factory(arch)
    prompts = prompts_of_lengths([1, 17, 50])  # (interpreter time: few, short prompts, yet chunked)
    prompts.append(prompts[2][:36] + [1, 2, 3])  # a prefix-cache hit on prompt 2's first blocks
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        # 32-token steps: chunked prefill, and steps mixing decodes with prefill chunks.
        llm = LLM(path, device=DEVICE, kernel_backend=backend, max_num_batched_tokens=32)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert tokens["triton"] == tokens["torch"]


def test_engine_batch_one_steps_take_the_gemv_and_match_torch(checkpoint_factory, monkeypatch) -> None:
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams
    calls = []
    real = tri.gemv
    monkeypatch.setattr(tri, "gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = []
    real_fused = tri.gemv_silu_and_mul
    monkeypatch.setattr(tri, "gemv_silu_and_mul", lambda *a, **k: fused.append(1) or real_fused(*a, **k))
    rope = []
    real_rope = tri.gemv_rope_and_store_kv
    monkeypatch.setattr(tri, "gemv_rope_and_store_kv", lambda *a, **k: rope.append(1) or real_rope(*a, **k))
    path = checkpoint_factory("qwen2")  # q/k/v biases go through the GEMV's bias
    prompt = {"prompt_token_ids": prompts_of_lengths([23])[0]}
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = {backend: LLM(path, device=DEVICE, kernel_backend=backend).generate(
        [prompt], params, use_tqdm=False)[0].outputs[0].token_ids for backend in ("torch", "triton")}
    assert calls, "a batch-1 decode step should use the Triton GEMV"
    assert fused, "a batch-1 decode step's gate/up projection should use the GEMV with SiLU-and-mul"
    assert rope, "a batch-1 decode step's q/k/v projection should use the GEMV with RoPE and the KV store"
    assert tokens["triton"] == tokens["torch"]


# ---- GPU, bf16 ------------------------------------------------------------------------------------

BF16_TOL = dict(atol=2e-2, rtol=2e-2)  # bf16 inputs, probabilities rounded to bf16 before P @ V


@gpu
@needs_cuda
@pytest.mark.parametrize("reqs", [
    [(s, 1) for s in (1, 17, 300, 1000, 2049)],  # decode
    [(37, 37), (300, 300), (1000, 200)],  # prefill, with a cached prefix
    [(120, 1), (900, 1), (50, 50), (600, 130)],  # mixed
])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (2, 128), (4, 128)])
def test_gpu_attention_bf16(reqs: list[tuple[int, int]], group: int, head_dim: int) -> None:
    check_attention(reqs, 8 * group, 8, head_dim, dtype=torch.bfloat16, device="cuda", **BF16_TOL)


@gpu
@needs_cuda
def test_gpu_decode_long_contexts_batch_64() -> None:
    rng = random.Random(0)
    reqs = [(rng.randint(1024, 8192), 1) for _ in range(64)]
    check_attention(reqs, 16, 8, 128, dtype=torch.bfloat16, device="cuda", **BF16_TOL)


@gpu
@needs_cuda
def test_gpu_elementwise_bf16() -> None:
    dev, dt = "cuda", torch.bfloat16
    x, r = (torch.randn(300, 4096, device=dev, dtype=dt) for _ in range(2))
    w = torch.randn(4096, device=dev, dtype=dt)
    out, res = tri.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = torch_ref.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(tri.rms_norm(x, w, 1e-6).float(), torch_ref.rms_norm(x, w, 1e-6).float(),
                               atol=2e-2, rtol=1e-2)
    g = torch.randn(300, 2 * 3072, device=dev, dtype=dt)
    torch.testing.assert_close(tri.silu_and_mul(g).float(), torch_ref.silu_and_mul(g).float(),
                               atol=2e-2, rtol=1e-2)
    q, k, v = (torch.randn(300, h, 128, device=dev, dtype=dt) for h in (16, 8, 8))
    cos_sin = torch.randn(4096, 128, device=dev)
    pos = torch.randint(0, 4096, (300,), device=dev)
    slots = torch.randperm(40 * 16, device=dev)[:300]
    kc, vc = (torch.zeros(40, 16, 8, 128, device=dev, dtype=dt) for _ in range(2))
    kc_ref, vc_ref = kc.float(), vc.float()
    ref_q = torch_ref.rope_and_store_kv(pos, q.float(), k.float(), v.float(), cos_sin, kc_ref, vc_ref, slots)
    out_q = tri.rope_and_store_kv(pos, q, k, v, cos_sin, kc, vc, slots)  # q in place
    torch.testing.assert_close(out_q.float(), ref_q, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(kc.float(), kc_ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(vc.view(-1, 8, 128)[slots], v, atol=0, rtol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [14336, 7168])  # Llama-3-8B's MLP, whole and halved for TP=2
def test_gpu_gemv_silu_and_mul_bf16_equals_the_two_kernels(d: int) -> None:
    from carpool.ops.triton.gemv import gemv, gemv_silu_and_mul

    w = torch.randn(2 * d, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(gemv_silu_and_mul(x, w), tri.silu_and_mul(gemv(x, w)))
    gate, up = torch.nn.functional.linear(x.float(), w.float()).chunk(2, dim=-1)
    torch.testing.assert_close(gemv_silu_and_mul(x, w).float(), torch.nn.functional.silu(gate) * up,
                               atol=2e-2, rtol=2e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("hq,hkv", [(32, 8), (16, 4)])  # Llama-3-8B's heads, whole and halved for TP=2
def test_gpu_gemv_rope_and_store_kv_bf16_equals_the_two_kernels(hq: int, hkv: int) -> None:
    from carpool.ops.triton.gemv import gemv, gemv_rope_and_store_kv

    w, x, _, cos_sin, caches = _qkv_rope_case(hq, hkv, 128, 4096, torch.bfloat16, False, "cuda")
    positions, slots = torch.tensor([37], device="cuda"), torch.tensor([13], device="cuda")
    qkv = gemv(x, w)
    q, k, v = qkv.split([hq * 128, hkv * 128, hkv * 128], dim=-1)
    expected = tri.rope_and_store_kv(positions, q.view(1, hq, 128), k.view(1, hkv, 128), v.view(1, hkv, 128),
                                     cos_sin, caches[0], caches[1], slots).clone()
    got = gemv_rope_and_store_kv(x, w, None, positions, cos_sin, caches[2], caches[3], slots, hq, hkv)
    # Same roundings; the rotation's multiply-adds may contract differently in the two kernels.
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(caches[2].float(), caches[0].float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(caches[3], caches[1])


# ---- one-pass sampling ---------------------------------------------------------------------------

def test_sampling_kernel_greedy_rows_take_the_argmax_lowest_index_on_ties() -> None:
    logits = torch.randn(5, 3000, device=DEVICE)
    logits[2, 10] = logits[2, 2500] = 50.0  # a tie: the lower index wins, as in torch.argmax
    temperature = torch.zeros(5, device=DEVICE)
    seeds = torch.arange(5, dtype=torch.int64, device=DEVICE)
    out = tri.sample_from_logits(logits, temperature, seeds)
    assert out.tolist() == logits.argmax(dim=-1).tolist()
    assert out[2].item() == 10


def test_sampling_kernel_draw_depends_only_on_the_row_seed() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 700, device=DEVICE, dtype=torch.float16)
    temperature = torch.full((6,), 0.8, device=DEVICE)
    seeds = torch.tensor([11, 22, 33, 44, 55, 66], dtype=torch.int64, device=DEVICE)
    full = tri.sample_from_logits(logits, temperature, seeds)
    perm = torch.tensor([3, 0, 5, 1], device=DEVICE)
    part = tri.sample_from_logits(logits[perm], temperature[perm], seeds[perm])
    assert part.tolist() == full[perm].tolist()
    other = tri.sample_from_logits(logits, temperature, seeds + 1000)
    assert other.tolist() != full.tolist()


def test_sampling_kernel_follows_the_softmax_distribution() -> None:
    # 300 rows in the interpreter (a row is a program there, ~30 ms each): 5 standard deviations are then
    # about 0.14 in the top class's share, which still tells T=1 (0.56) from T=0.5 (0.83) or no noise (1).
    check_sampling_distribution(DEVICE, n=300 if INTERPRET else 3000)


@gpu
@needs_cuda
def test_gpu_sampling_kernel_follows_the_softmax_distribution() -> None:
    """Compiled, the kernel takes its logs with lg2.approx (the interpreter with tl.log2)."""
    check_sampling_distribution("cuda", n=20000)


def check_sampling_distribution(device: str, n: int) -> None:
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], device=device)
    logits = base.repeat(n, 1)
    for temperature, name in ((1.0, "T=1"), (0.5, "T=0.5")):
        temp = torch.full((n,), temperature, device=device)
        seeds = torch.randint(0, 1 << 40, (n,), dtype=torch.int64, device=device)
        counts = torch.bincount(tri.sample_from_logits(logits, temp, seeds), minlength=6).float()
        expected = torch.softmax(base / temperature, dim=0) * n
        # every class within 5 standard deviations of its binomial count
        std = (expected * (1 - expected / n)).sqrt()
        assert bool(((counts - expected).abs() <= 5 * std + 1).all()), (name, counts, expected)


@interpreter_only
def test_engine_seeded_sampling_with_the_one_pass_kernel_is_batch_independent(checkpoint_factory) -> None:
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams

    llm = LLM(checkpoint_factory("llama"), device="cpu", kernel_backend="triton")
    assert llm.engine.core.executor.runner.sampler.fast_sample is not None
    prompts = prompts_of_lengths([5, 12, 20])  # (interpreter time: short prompts, 3 tokens)
    seeded = SamplingParams(temperature=0.9, seed=5, max_tokens=3, ignore_eos=True)
    other = SamplingParams(temperature=0.9, max_tokens=3, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": prompts[1]}], seeded, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate([{"prompt_token_ids": p} for p in prompts], [other, seeded, other], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


@interpreter_only
def test_engine_decodes_a_shared_prefix_with_cascade_attention(checkpoint_factory) -> None:
    """16 requests behind one 320-token prefix: after the first computes it, the others hit its cached
    blocks, and their decode steps read it once through the cascade kernels; tokens equal torch_ref's."""
    from checkpoints import prompts_of_lengths

    from carpool import LLM, SamplingParams
    from carpool.worker.model_runner import ModelRunner

    path = checkpoint_factory("llama")
    prefix = prompts_of_lengths([320], seed=21)[0]
    prompts = [prefix + tail for tail in prompts_of_lengths([5] * 16, seed=22)]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)  # (one decode step: interpreter time)
    seen: list[int] = []
    forward = ModelRunner._forward

    def spy(self, inputs, fixup):
        seen.append(inputs.cascade_prefix_len)
        return forward(self, inputs, fixup)

    ModelRunner._forward = spy  # type: ignore[method-assign]
    try:
        fast = LLM(path, device="cpu", kernel_backend="triton").generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        ModelRunner._forward = forward  # type: ignore[method-assign]
    ref = LLM(path, device="cpu").generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert 320 in seen  # the decode steps took the cascade path
    assert [o.outputs[0].token_ids for o in fast] == [o.outputs[0].token_ids for o in ref]
