"""Triton kernels against their torch_ref twins: paged attention (decode, prefill, cascade, the decode
work balance), norms, activation, RoPE with the KV store, the batch-1 GEMVs and the one-pass sampler."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from triton import cdiv  # noqa: E402
from triton_cases import (  # noqa: E402
    DEVICE,
    INTERPRET,
    attention_without_store,
    check_attention,
    gpu,
    make_batch,
    needs_cuda,
    poison_outputs,
)

from carpool.ops import torch_ref  # noqa: E402
from carpool.ops import triton as tri  # noqa: E402
from carpool.ops.triton.attention import (  # noqa: E402
    DECODE_TARGET_ITEMS,
    MIN_TOKENS_PER_SPLIT,
    ORDER_MAX_SPLITS,
    balanced_decode_plan,
    decode_num_splits,
)
from carpool.ops.triton.decode_attention import DecodeConfig, decode_attention  # noqa: E402
from carpool.ops.triton.paged_kv import store_kvcache  # noqa: E402
from carpool.ops.triton.prefill_attention import PrefillConfig, prefill_attention  # noqa: E402

# Idle decode splits compute log2(0) = -inf on purpose; numpy warns about it in the interpreter.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    poison_outputs(monkeypatch)


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


@pytest.mark.parametrize("m,with_bias", [(2, True), (3, False), (5, True), (8, False), (16, True)])
def test_gemv_rows_matches_linear(m: int, with_bias: bool) -> None:
    from carpool.ops.triton.gemv import GemvRowsConfig, gemv_rows

    n, k = 70, 300  # ragged row and column tiles for every config below
    w, x = torch.randn(n, k, device=DEVICE), torch.randn(m, k, device=DEVICE)
    b = torch.randn(n, device=DEVICE) if with_bias else None
    expected = torch.nn.functional.linear(x, w, b)
    for config in (None, GemvRowsConfig(block_n=16, block_k=64)):  # None: the default
        torch.testing.assert_close(gemv_rows(x, w, b, config), expected, atol=1e-4, rtol=1e-4)


def test_gemv_rows_bf16_is_within_one_rounding_of_a_float32_matmul() -> None:
    from carpool.ops.triton.gemv import gemv_rows

    w = torch.randn(40, 200, device=DEVICE).bfloat16()
    x, b = torch.randn(4, 200, device=DEVICE).bfloat16(), torch.randn(40, device=DEVICE).bfloat16()
    got = gemv_rows(x, w, b)
    assert got.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=2 ** -7)  # bf16: 8 significant bits


@pytest.mark.parametrize("m,d", [(2, 37), (7, 20)])  # ragged rows (d not a multiple of block_n / 2)
def test_gemv_rows_silu_and_mul_equals_gemv_rows_then_silu_and_mul(m: int, d: int) -> None:
    from carpool.ops.triton.gemv import GemvRowsConfig, gemv_rows, gemv_rows_silu_and_mul

    w = 0.05 * torch.randn(2 * d, 300, device=DEVICE)  # gate values of a few units: no exp overflow
    x = torch.randn(m, 300, device=DEVICE)
    gate, up = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
    torch.testing.assert_close(gemv_rows_silu_and_mul(x, w), torch.nn.functional.silu(gate) * up,
                               atol=1e-4, rtol=1e-4)
    for config in (None, GemvRowsConfig(block_n=16, block_k=64)):  # the same roundings: equal bits
        assert torch.equal(gemv_rows_silu_and_mul(x, w, config), tri.silu_and_mul(gemv_rows(x, w, config=config)))


def test_gemv_rows_refuses_more_than_16_rows_an_unpaired_weight_and_a_bad_config() -> None:
    from carpool.ops.triton.gemv import GemvRowsConfig, gemv_rows, gemv_rows_silu_and_mul

    w = torch.randn(8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="gemv_rows: x must be"):
        gemv_rows(torch.randn(17, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="gate and up"):
        gemv_rows_silu_and_mul(torch.randn(2, 32, device=DEVICE), w[1:])
    with pytest.raises(ValueError, match="block_n"):
        GemvRowsConfig(block_n=8)
