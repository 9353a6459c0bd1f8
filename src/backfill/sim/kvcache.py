"""Paged KV cache with a prefix cache, counted rather than materialized.

vLLM v1 keeps a fixed pool of `num_gpu_blocks` blocks of `block_size` tokens. A running request
holds `ceil(computed_tokens / block_size)` blocks. Full prompt blocks are also entered in a
prefix cache keyed by their chained hash (see `tokens.py`): a later request whose prompt starts
with the same blocks references them instead of recomputing them. A block whose last reference
is released stays cached but becomes *evictable*; new allocations evict evictable blocks in
least-recently-freed order (a request's blocks are freed tail first, so the tail of a prompt is
evicted before its shared head). `usage` counts every block that is not free, where free means
unused or evictable (vLLM's `kv_cache_usage_perc`).

To keep a step cheap the pool is not a list of block objects: private (uncached) blocks are a
count per request and a count of free blocks; only cached blocks have an entry (hash -> number
of references), plus an insertion-ordered dict of evictable hashes for the LRU. One
simplification against vLLM: vLLM's free queue interleaves never-cached and evictable blocks by
free time, while here allocation takes never-cached free blocks first and evicts cached blocks
only when none are left, which slightly favours prefix hits.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["KVCache"]


class BlockHolder(Protocol):
    """What the cache needs of a request (the engine's `SimRequest` satisfies it)."""

    num_blocks: int  # blocks held in total (shared + private)
    shared: list[int]  # hashes of the cached blocks referenced, in prompt order


class KVCache:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_uncached = num_blocks  # free blocks holding no cached content
        self.refs: dict[int, int] = {}  # cached block hash -> references
        self.evictable: dict[int, None] = {}  # cached, unreferenced; oldest first
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return self.free_uncached + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0..1), evictable cached blocks counting as free."""
        return 1.0 - self.num_free / self.num_blocks

    def match(self, block_hashes: tuple[int, ...], num_tokens: int) -> tuple[int, int]:
        """Longest cached prefix: (blocks hit, of which evictable). No side effects.

        At most `(num_tokens - 1) // block_size` blocks: the last prompt token is always
        computed so that the step produces logits (vLLM does the same).
        """
        limit = (num_tokens - 1) // self.block_size
        refs = self.refs
        evictable = self.evictable
        hits = idle = 0
        for block_hash in block_hashes:
            if hits >= limit or block_hash not in refs:
                break
            hits += 1
            if block_hash in evictable:
                idle += 1
        return hits, idle

    def acquire(self, holder: BlockHolder, block_hashes: tuple[int, ...], hits: int) -> None:
        """Reference the first `hits` cached blocks for `holder` (after `match`)."""
        refs = self.refs
        evictable = self.evictable
        for block_hash in block_hashes[:hits]:
            if refs[block_hash] == 0:
                del evictable[block_hash]
            refs[block_hash] += 1
            holder.shared.append(block_hash)
        holder.num_blocks += hits

    def allocate(self, holder: BlockHolder, count: int) -> bool:
        """Give `holder` `count` more private blocks, evicting cached ones if needed."""
        if count <= self.free_uncached:
            self.free_uncached -= count
            holder.num_blocks += count
            return True
        if count > self.num_free:
            return False
        take = count - self.free_uncached
        self.free_uncached = 0
        evictable = self.evictable
        refs = self.refs
        for _ in range(take):
            block_hash = next(iter(evictable))
            del evictable[block_hash]
            del refs[block_hash]
        self.evictions += take
        holder.num_blocks += count
        return True

    def commit(self, holder: BlockHolder, block_hash: int) -> None:
        """One of `holder`'s private blocks now holds a full prompt block: cache it.

        A block whose hash is already cached (computed concurrently by another request, or
        evictable from an earlier one) stays private: the cache keeps one block per hash.
        """
        if block_hash in self.refs:
            return
        self.refs[block_hash] = 1
        holder.shared.append(block_hash)

    def release(self, holder: BlockHolder) -> None:
        """Free every block `holder` holds; cached ones become evictable, tail first."""
        refs = self.refs
        evictable = self.evictable
        shared = holder.shared
        for block_hash in reversed(shared):
            left = refs[block_hash] - 1
            refs[block_hash] = left
            if left == 0:
                evictable[block_hash] = None
        self.free_uncached += holder.num_blocks - len(shared)
        shared.clear()
        holder.num_blocks = 0
