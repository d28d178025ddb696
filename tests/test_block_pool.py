"""BlockPool and KVCacheManager without a model: ref counts, LRU eviction, prefix matching."""

from __future__ import annotations

import pytest

from carpool.core.block_pool import BlockPool, hash_block_tokens
from carpool.core.kv_cache_manager import KVCacheManager
from carpool.request import Request
from carpool.sampling_params import SamplingParams

SEED = b"\x00" * 32


def req(rid: str, tokens: list[int], max_tokens: int = 4) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=max_tokens))


def test_new_blocks_come_from_the_free_queue_head_and_return_to_its_tail():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert (a.block_id, b.block_id) == (0, 1)
    assert pool.num_free_blocks == 2
    pool.free_blocks([b, a])
    assert list(pool.free_queue) == [2, 3, 1, 0]
    pool.check_integrity()


def test_asking_for_more_blocks_than_free_raises():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(3)


def test_a_shared_block_is_freed_only_when_its_last_holder_lets_go():
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    pool.touch([blk])
    assert blk.ref_cnt == 2
    pool.free_blocks([blk])
    assert blk.block_id not in pool.free_queue
    pool.free_blocks([blk])
    assert blk.block_id in pool.free_queue
    pool.check_integrity()


def test_evicting_a_cached_block_drops_its_hash():
    pool = BlockPool(1)
    (blk,) = pool.get_new_blocks(1)
    pool.cache_block(blk, b"h")
    pool.free_blocks([blk])
    assert pool.get_cached_block(b"h") is blk  # still cached while free
    (again,) = pool.get_new_blocks(1)
    assert again is blk and blk.block_hash is None
    assert pool.get_cached_block(b"h") is None
    assert pool.num_evictions == 1


def test_hash_chain_depends_on_the_parent():
    h1 = hash_block_tokens(SEED, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(SEED, [3, 4])
    assert hash_block_tokens(SEED, [1, 2]) == h1
    assert hash_block_tokens(SEED, [1, 2], b"salt") != h1


def test_allocate_slots_grows_the_table_one_block_per_block_size_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    r = req("a", list(range(10)))
    assert kv.allocate_slots(r, 10) == [0, 1, 2]
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 1) == []  # slot 10 fits in block 2
    r.num_computed_tokens = 12
    assert kv.allocate_slots(r, 1) == [3]
    kv.check_integrity(["a"])
    kv.free(r)
    kv.check_integrity([])
    assert kv.pool.num_free_blocks == 8


def test_allocate_slots_returns_none_and_changes_nothing_when_short():
    kv = KVCacheManager(num_blocks=2, block_size=4, enable_caching=False)
    r = req("a", list(range(12)))
    assert kv.allocate_slots(r, 12) is None
    assert kv.block_ids("a") == [] and kv.pool.num_free_blocks == 2
    kv.check_integrity([])


def test_prefix_hit_reuses_full_blocks_and_leaves_the_last_token_to_compute():
    kv = KVCacheManager(num_blocks=8, block_size=4, hash_seed=SEED)
    a = req("a", list(range(8)))
    kv.allocate_slots(a, 8)
    kv.free(a)
    b = req("b", list(range(8)))  # identical 2-block prompt: only 1 block may be reused
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4 and [x.block_id for x in blocks] == [0]
    c = req("c", list(range(9)))  # 8 cached tokens + 1 new
    blocks, n = kv.get_computed_blocks(c)
    assert n == 8 and [x.block_id for x in blocks] == [0, 1]
    assert kv.prefix_stats.queries == 17 and kv.prefix_stats.hits == 12


def test_prompts_sharing_a_later_block_but_not_the_first_do_not_share_it():
    kv = KVCacheManager(num_blocks=8, block_size=2, hash_seed=SEED)
    a = req("a", [1, 1, 5, 5, 9])
    kv.allocate_slots(a, 5)
    b = req("b", [2, 2, 5, 5, 9])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 0 and blocks == []


def test_requests_with_different_cache_salts_do_not_share_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=2, hash_seed=SEED)
    a = req("a", [1, 2, 3, 4, 5])
    a.cache_salt = "tenant-1"
    kv.allocate_slots(a, 5)
    other = req("b", [1, 2, 3, 4, 5])
    other.cache_salt = "tenant-2"
    assert kv.get_computed_blocks(other)[1] == 0
    same = req("c", [1, 2, 3, 4, 5])
    same.cache_salt = "tenant-1"
    assert kv.get_computed_blocks(same)[1] == 4


def test_cache_hit_on_a_free_block_takes_it_out_of_the_eviction_queue():
    kv = KVCacheManager(num_blocks=3, block_size=2, hash_seed=SEED)
    a = req("a", [1, 2, 3])
    kv.allocate_slots(a, 3)  # blocks 0 (full, hashed) and 1
    kv.free(a)
    b = req("b", [1, 2, 7, 8, 9])
    hit, n = kv.get_computed_blocks(b)
    assert n == 2
    # needs 3 blocks in all: the hit plus 2 fresh ones; the hit must not be evicted to make room
    assert kv.allocate_slots(b, 3, hit) is not None
    assert kv.block_ids("b")[0] == hit[0].block_id
    kv.check_integrity(["b"])


def test_lru_eviction_takes_the_least_recently_freed_cached_block():
    kv = KVCacheManager(num_blocks=4, block_size=2, hash_seed=SEED)
    old, new = req("old", [1, 2, 3]), req("new", [4, 5, 6])
    kv.allocate_slots(old, 3)
    kv.free(old)
    kv.allocate_slots(new, 3)
    kv.free(new)
    filler = req("f", [7, 8, 9, 10, 11, 12])  # 3 blocks: both empty ones and the LRU cached one
    kv.allocate_slots(filler, 6)
    assert kv.get_computed_blocks(req("x", [1, 2, 3]))[1] == 0  # old prefix evicted
    assert kv.get_computed_blocks(req("y", [4, 5, 6]))[1] == 2  # newer prefix still cached
    kv.check_integrity(["f"])


def test_reset_prefix_cache_only_when_idle():
    kv = KVCacheManager(num_blocks=4, block_size=2, hash_seed=SEED)
    a = req("a", [1, 2, 3])
    kv.allocate_slots(a, 3)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(req("b", [1, 2, 3]))[1] == 0
