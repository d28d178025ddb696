"""Shared set-up of the Triton kernel tests (test_triton_ops.py, test_triton_distributed.py,
test_triton_worker.py, test_fused_moe*.py, ...): where kernels run (compiled on a GPU, or the interpreter
on CPU: conftest.py sets TRITON_INTERPRET=1), markers, random paged-attention batches with their torch_ref
expectation, and a random mixture-of-experts step at the Qwen3-30B-A3B expert shape (GPU tests).

Without a GPU the kernels run through the Triton interpreter in float32 (and float16; bf16 `tl.dot` is
wrong in the interpreter); with a GPU the same unmarked tests run compiled in float32, and the `gpu`
tests compare bf16 kernels with torch_ref on upcast float32 inputs. Outputs are allocated poisoned with
NaN (`poison_outputs`), so a kernel that skips an element fails.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from triton import cdiv  # noqa: E402

from carpool.forward_batch import AttentionMetadata, TritonAttentionMetadata  # noqa: E402
from carpool.layers.moe import Routing  # noqa: E402
from carpool.ops import torch_ref  # noqa: E402
from carpool.ops import triton as tri  # noqa: E402
from carpool.ops.triton import utils  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")
# A CPU engine with the Triton backend: its kernels run only through the interpreter.
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="a CPU engine's Triton kernels need the interpreter")


def poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape, dtype, device):
        # (integer outputs, such as expert ids, start as -1)
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
    monkeypatch.setattr(utils, "empty_output", poisoned)


def qwen3_moe_step(num_tokens: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w13, w2, hidden, topk_weights, topk_ids) on the GPU: float32 experts of Qwen3-30B-A3B's shape
    (128 experts, hidden 2048, intermediate 768; the caller rounds or quantizes them), bf16 hidden rows of
    num_tokens tokens and their top-8 Qwen3-MoE routing."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    e, h, i, k = 128, 2048, 768, 8
    w13 = torch.randn(e, 2 * i, h, generator=gen, device="cuda") / h ** 0.5
    w2 = torch.randn(e, h, i, generator=gen, device="cuda") / i ** 0.5
    hidden = torch.randn(num_tokens, h, generator=gen, device="cuda").bfloat16()
    weights, ids = Routing.qwen_moe(e, k, True).select(torch.randn(num_tokens, e, generator=gen, device="cuda"))
    return w13, w2, hidden, weights, ids


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


def attention_without_store(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: AttentionMetadata,
                            scale: float) -> torch.Tensor:
    """torch_ref attention over the cache as it is (no new K/V stored)."""
    no_kv = torch.empty(0, kc.shape[2], kc.shape[3], dtype=q.dtype, device=q.device)
    no_store = AttentionMetadata(meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                 torch.empty(0, dtype=torch.int64, device=q.device), meta.max_query_len,
                                 meta.max_seq_len, meta.query_start_loc_cpu, meta.seq_lens_cpu)
    return torch_ref.paged_attention(q, no_kv, no_kv, kc.clone(), vc.clone(), no_store, scale)
