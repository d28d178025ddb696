"""KVCacheManager: each request's block table, prefix matching and slot allocation.

Plain Python over plain data (no torch): the scheduler asks it two questions, "how much of this
request is already cached?" (`get_computed_blocks`) and "give this request room for N more tokens"
(`allocate_slots`, which answers None when memory is short so the scheduler can preempt).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from carpool.core.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from carpool.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 hash_seed: bytes | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        # Root of every hash chain; random per engine unless a test pins it.
        self.hash_seed = hash_seed if hash_seed is not None else os.urandom(32)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_hashed_blocks: dict[str, int] = {}
        self.prefix_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """Extend request.block_hashes to cover its first `num_full_blocks` blocks."""
        hashes = request.block_hashes
        bs = self.block_size
        salt = request.cache_salt
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.hash_seed
            extra = salt.encode() if (salt and i == 0) else b""
            hashes.append(hash_block_tokens(parent, request.token_ids(i * bs, (i + 1) * bs), extra))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks; always leaves the last known token to compute, so the
        step that admits the request produces its next-token logits."""
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        hit: list[KVCacheBlock] = []
        for h in hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hit.append(block)
        num_hit_tokens = len(hit) * self.block_size
        self.prefix_stats.queries += request.num_tokens
        self.prefix_stats.hits += num_hit_tokens
        return hit, num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> list[int] | None:
        """Make room for `num_new_tokens` beyond what is computed (plus any cache-hit blocks being
        adopted now). Returns the ids of freshly allocated blocks, or None if memory is short, in
        which case nothing changed."""
        blocks = self.req_blocks.get(request.request_id)
        if blocks is not None and not new_computed_blocks:
            # Hot path (a decode): the tokens still fit in the blocks held; nothing new becomes full.
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(blocks) * self.block_size and (
                    not self.enable_caching or min(total, request.num_tokens) // self.block_size
                    <= self.num_hashed_blocks[request.request_id]):
                return []
        new_computed_blocks = new_computed_blocks or []
        blocks = blocks if blocks is not None else []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = cdiv(total, self.block_size) - len(blocks) - len(new_computed_blocks)
        # Cache-hit blocks nobody holds sit in the free queue; adopting them shrinks what is free.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_evictable_hits:
            return None
        if request.request_id not in self.req_blocks:
            self.req_blocks[request.request_id] = blocks
            self.num_hashed_blocks[request.request_id] = 0
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            blocks.extend(new_computed_blocks)
            self.num_hashed_blocks[request.request_id] = len(blocks)
        fresh = self.pool.get_new_blocks(max(num_needed, 0))
        blocks.extend(fresh)
        if self.enable_caching:  # only blocks whose every token value is known can be hashed
            self._cache_full_blocks(request, blocks, min(total, request.num_tokens) // self.block_size)
        return [b.block_id for b in fresh]

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_full: int) -> None:
        """Register blocks that are full once this step's tokens are written. Their K/V is computed
        in the same step, before any later schedule() could look them up."""
        start = self.num_hashed_blocks[request.request_id]
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self.num_hashed_blocks[request.request_id] = num_full

    def free_tail(self, request: Request, num_tokens: int) -> int:
        """Free the request's blocks past those its first `num_tokens` tokens need (the slots of rejected
        proposed tokens); returns the number of blocks it keeps. Freed blocks carry no hash (hashes
        cover known tokens only), so they are the first to be reused."""
        blocks = self.req_blocks.get(request.request_id)
        if blocks is None:
            return 0
        keep = cdiv(num_tokens, self.block_size)
        if len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            assert keep >= self.num_hashed_blocks[request.request_id], "a freed tail block had a hash"
            self.pool.free_blocks(reversed(tail), reuse_first=True)
        return len(blocks)

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_hashed_blocks.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def check_integrity(self, live_request_ids: Iterable[str] | None = None) -> None:
        """Ref counts equal the number of block tables holding each block; with no live requests,
        every block is free."""
        self.pool.check_integrity()
        counts = [0] * self.pool.num_blocks
        for blocks in self.req_blocks.values():
            for b in blocks:
                counts[b.block_id] += 1
        for block in self.pool.blocks:
            assert block.ref_cnt == counts[block.block_id], (
                f"block {block.block_id}: ref_cnt={block.ref_cnt}, held by {counts[block.block_id]} tables")
        if live_request_ids is not None:
            live = set(live_request_ids)
            assert set(self.req_blocks) <= live, f"blocks held by dead requests {set(self.req_blocks) - live}"
