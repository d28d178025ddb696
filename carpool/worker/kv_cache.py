"""KV memory: how many blocks fit the budget, and one allocation bound to every attention layer."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

from carpool.config import CacheConfig, ModelConfig
from carpool.layers.attention import Attention

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB: a modest fixed budget for the CPU path


def bytes_per_block(model: ModelConfig, block_size: int, num_kv_heads_per_rank: int,
                    dtype: torch.dtype | None = None) -> int:
    """K and V of one block across all layers, on one rank, stored as `dtype` (default: the model's)."""
    elem = torch.tensor([], dtype=dtype or model.dtype).element_size()
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


CUDA_GRAPH_RESERVE_BYTES = 512 << 20  # graph pools and allocator slack, kept out of the KV budget


def gpu_num_blocks(cache: CacheConfig, per_block: int, device: torch.device,
                   profile_run: Callable[[], int]) -> int:
    """KV blocks for a GPU: an explicit count or byte budget if given; otherwise what is left of
    gpu_memory_utilization x total memory after the weights and the peak activations of a profiled
    forward at the largest step. profile_run returns the bytes of the throwaway KV cache it held through
    its peak: the real cache takes their place, so they are not reserved twice (at 8192 batched tokens
    of Qwen3-30B-A3B, 0.75 GiB: 512 blocks, 7% of an H100's cache beside 57 GiB of weights)."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if cache.kv_cache_memory_bytes is not None:
        return num_blocks_for_budget(cache.kv_cache_memory_bytes, per_block)
    # An engine dropped without shutdown() may still hold its KV cache through a reference cycle until the
    # collector runs: collect first, so that only live tensors count against this engine's budget.
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    held_before = torch.cuda.memory_allocated(device)  # this model's weights, and anything else alive
    profile_cache_bytes = profile_run()
    peak = torch.cuda.max_memory_allocated(device) - profile_cache_bytes
    free, total = torch.cuda.mem_get_info(device)
    # Memory held outside this process's torch allocator (other processes, CUDA context, NCCL).
    non_torch = (total - free) - torch.cuda.memory_reserved(device)
    budget = int(total * cache.gpu_memory_utilization) - peak - non_torch - CUDA_GRAPH_RESERVE_BYTES
    torch.cuda.empty_cache()
    logger.info("GPU memory: total %.1f GiB, peak torch %.2f GiB (without the profile's %.2f GiB KV cache), other "
                "%.2f GiB -> KV budget %.2f GiB", total / 2**30, peak / 2**30, profile_cache_bytes / 2**30,
                non_torch / 2**30, budget / 2**30)
    if budget < per_block:
        raise ValueError(f"gpu_memory_utilization: {cache.gpu_memory_utilization} leaves no room for the KV "
                         f"cache (weights and activations peak at {peak / 2**30:.2f} GiB of "
                         f"{total / 2**30:.1f} GiB, of which {held_before / 2**30:.2f} GiB was allocated "
                         "before the profiled step: the weights, and any tensors of this process still "
                         "alive, such as an engine not shut down); raise it or lower max_num_batched_tokens")
    return num_blocks_for_budget(budget, per_block)
