"""BlockPool: fixed-size KV blocks with reference counts, an LRU free queue and a hash -> block map.

Invariants (checked by `check_integrity`):
- every block is either in the free queue (ref_cnt == 0) or held by at least one request (ref_cnt > 0);
- a block with a hash is the one block registered under that hash in `cached_blocks`;
- the free queue is ordered least-recently-freed first, so fresh allocations evict the LRU cached block
  (blocks freed with `reuse_first`, which hold nothing cacheable, go ahead of every cached one).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def hash_block_tokens(parent_hash: bytes, token_ids: Sequence[int], extra_keys: bytes = b"") -> bytes:
    """Content hash of one full block, chained from its parent so equal hashes mean equal prefixes.

    sha256 rather than Python's hash(): a client must not be able to forge a collision and read
    another request's cached K/V.
    """
    h = hashlib.sha256(parent_hash)
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(b"\x00extra")
        h.update(extra_keys)
    return h.digest()


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks: must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # block_id -> block, in eviction order (first = least recently freed).
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached_blocks: dict[bytes, KVCacheBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: truly empty ones plus cached ones nobody holds."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:  # evict the least recently used cached block
                del self.cached_blocks[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cache-hit blocks, pulling free ones out of the eviction queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock], reuse_first: bool = False) -> None:
        """Drop one reference from each block; blocks reaching 0 join the end of the queue in the
        given order (callers pass a request's blocks tail first, so a shared prefix is evicted last).
        `reuse_first`: they join the front instead (blocks holding nothing worth caching)."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed more often than held"
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
                if reuse_first:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVCacheBlock, block_hash: bytes) -> None:
        """Register a full block under its content hash. If another block already holds the same
        content (two requests computed it at once), the first stays registered."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached_blocks:
            return
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only possible when no request holds a block."""
        if len(self.free_queue) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        return True

    def check_integrity(self) -> None:
        for block in self.blocks:
            in_queue = block.block_id in self.free_queue
            assert (block.ref_cnt == 0) == in_queue, (
                f"block {block.block_id}: ref_cnt={block.ref_cnt} but in_free_queue={in_queue}")
            if block.block_hash is not None:
                assert self.cached_blocks.get(block.block_hash) is block, (
                    f"block {block.block_id} has a hash that maps elsewhere")
        for h, block in self.cached_blocks.items():
            assert block.block_hash == h, f"cached map entry for block {block.block_id} is stale"
