"""KV memory: how many blocks fit the budget, and one allocation bound to every attention layer."""

from __future__ import annotations

import logging

import torch

from carpool.config import CacheConfig, ModelConfig
from carpool.layers.attention import Attention

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: a modest fixed budget for the CPU path


def bytes_per_block(model: ModelConfig, block_size: int, num_kv_heads_per_rank: int) -> int:
    """K and V of one block across all layers, on one rank."""
    elem = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * model.num_hidden_layers * block_size * num_kv_heads_per_rank * model.head_dim * elem


def num_blocks_for_budget(budget_bytes: int, per_block: int) -> int:
    num = budget_bytes // per_block
    if num < 1:
        raise ValueError(f"kv_cache_memory_bytes: {budget_bytes} bytes hold no KV block "
                         f"(one block takes {per_block} bytes)")
    return int(num)


def cpu_num_blocks(cache: CacheConfig, per_block: int) -> int:
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    return num_blocks_for_budget(cache.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES, per_block)


def allocate_kv_cache(layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> torch.Tensor:
    """One tensor [2, num_layers, num_blocks, block_size, Hkv, D]; each layer gets views of its K and V."""
    first = layers[0]
    cache = torch.zeros(2, len(layers), num_blocks, block_size, first.num_kv_heads, first.head_dim,
                        dtype=dtype, device=device)
    for i, layer in enumerate(layers):
        layer.k_cache = cache[0, i]
        layer.v_cache = cache[1, i]
    logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, block_size,
                cache.numel() * cache.element_size() / 2**20)
    return cache
