"""Paged attention over a packed mixed batch (decodes, prefill chunks, prefix hits), in plain PyTorch."""

from __future__ import annotations

import torch

from carpool.forward_batch import AttentionMetadata
from carpool.ops.torch_ref.elementwise import qk_norm_rotary, rotary_embedding
from carpool.utils import cdiv


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V into its cache slot. Slots < 0 (padding) are skipped."""
    num_heads, head_dim = k_cache.shape[-2:]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(-1, num_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def rope_and_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, q_weight: torch.Tensor | None = None,
                      k_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """RoPE on q and k (after Qwen3's per-head q/k RMSNorm when weights are given), the rotated k and v
    stored at their cache slots; returns the rotated q. One op so GPU backends can fuse the passes."""
    if q_weight is not None:
        assert k_weight is not None
        q, k = qk_norm_rotary(positions, q, k, cos_sin_cache, q_weight, k_weight, eps)
    else:
        q, k = rotary_embedding(positions, q, k, cos_sin_cache)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    return q


def paged_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """Store the new K/V (unless k and v are None: already stored, see rope_and_store_kv), then attend
    causally over each request's whole context. A cache holding k / k_scale and v / v_scale (the FP8 KV
    cache, torch_ref.quant) is read back in float32 times the scales.

    q: [T, Hq, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D].
    Request i's queries are the last q_len positions of its seq_len-token context, so query j may see
    keys 0 .. seq_len - q_len + j.
    """
    if k is not None:
        assert v is not None
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    qsl = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        num_blocks = cdiv(seq_len, block_size)
        blocks = meta.block_tables[i, :num_blocks].long()
        kc = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        vc = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        if k_scale != 1.0 or v_scale != 1.0:
            kc, vc = kc * k_scale, vc * v_scale
        # [Hkv, group * q_len, D]: the query heads sharing one KV head are stacked.
        qi = q[start:end].float().view(q_len, num_kv_heads, group, head_dim)
        qi = qi.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, head_dim)
        scores = torch.matmul(qi, kc.transpose(0, 1).transpose(1, 2)) * scale  # [Hkv, G*L, S]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).repeat(group)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        o = torch.matmul(probs, vc.transpose(0, 1))  # [Hkv, G*L, D]
        o = o.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        out[start:end] = o.reshape(q_len, num_q_heads, head_dim).to(q.dtype)
    return out
