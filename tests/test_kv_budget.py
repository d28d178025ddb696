"""The GPU KV budget (gpu_num_blocks) against a simulated CUDA allocator: what counts as held memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from carpool.config import CacheConfig
from carpool.worker.kv_cache import CUDA_GRAPH_RESERVE_BYTES, gpu_num_blocks

GIB = 1 << 30
TOTAL = 80 * GIB


class _Allocation:
    """Stands in for a tensor on the simulated GPU; `owner` lets a test build a reference cycle."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.owner: object | None = None


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's memory queries answered from the _Allocation objects alive (a WeakSet), as the caching
    allocator would answer from the tensors alive."""
    live: weakref.WeakSet[_Allocation] = weakref.WeakSet()

    def allocated(device=None) -> int:
        return sum(a.nbytes for a in live)

    for name in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", allocated)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (TOTAL - allocated(), TOTAL))
    return live


def test_an_engine_dropped_without_shutdown_in_a_reference_cycle_does_not_count_against_the_next(fake_cuda) -> None:
    weights = _Allocation(1 * GIB)
    fake_cuda.add(weights)
    per_block = 1 << 20
    gc.disable()  # the cycle below stays uncollected until someone collects it, as between two test functions
    try:
        old_kv = _Allocation(70 * GIB)
        old_kv.owner = old_kv  # a cycle: dropping the name does not free it
        fake_cuda.add(old_kv)
        del old_kv
        assert sum(a.nbytes for a in fake_cuda) == 71 * GIB
        blocks = gpu_num_blocks(CacheConfig(gpu_memory_utilization=0.9), per_block, torch.device("cuda", 0),
                                profile_run=lambda: 0)
    finally:
        gc.enable()
    assert blocks == (int(TOTAL * 0.9) - 1 * GIB - CUDA_GRAPH_RESERVE_BYTES) // per_block


def test_memory_still_referenced_is_counted_and_the_error_says_how_much_was_held(fake_cuda) -> None:
    held = [_Allocation(72 * GIB)]  # an engine not shut down and still referenced
    fake_cuda.add(held[0])
    with pytest.raises(ValueError, match=r"gpu_memory_utilization: 0.9 leaves no room.*72.00 GiB was allocated"):
        gpu_num_blocks(CacheConfig(gpu_memory_utilization=0.9), 1 << 20, torch.device("cuda", 0),
                       profile_run=lambda: 0)
    assert held


def test_the_profile_runs_throwaway_kv_cache_is_left_to_the_real_cache(fake_cuda) -> None:
    """The peak of the profiled step includes its own small KV cache; the real cache replaces it, so only
    the weights and the activations are kept out of the budget."""
    weights = _Allocation(40 * GIB)
    fake_cuda.add(weights)
    alive: list[_Allocation] = []

    def profile_run() -> int:
        alive.extend([_Allocation(2 * GIB), _Allocation(3 * GIB)])  # its KV cache, its activations
        fake_cuda.update(alive)
        return 2 * GIB

    per_block = 1 << 20
    blocks = gpu_num_blocks(CacheConfig(gpu_memory_utilization=0.9), per_block, torch.device("cuda", 0), profile_run)
    assert blocks == (int(TOTAL * 0.9) - 40 * GIB - 3 * GIB - CUDA_GRAPH_RESERVE_BYTES) // per_block
