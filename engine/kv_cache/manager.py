"""KVCacheManager: which KV blocks each request owns, prefix-cache lookups, and allocation of the
slots a step needs. Caller: engine.scheduler only (the runner just receives block ids).

The manager never decides who runs: `allocate_slots` answers None when the pool is short and the
scheduler chooses whom to preempt.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.block_hash import extend_block_hashes
from engine.kv_cache.block_pool import BlockPool, KVCacheBlock
from engine.request import Request


@dataclass
class PrefixCacheStats:
    num_queries: int = 0  # prompt tokens looked up (cumulative)
    num_hits: int = 0     # of those, tokens found in the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # req_id -> how many of its leading blocks are registered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_usable_blocks(self) -> int:
        return self.block_pool.num_usable_blocks

    @property
    def max_num_tokens(self) -> int:
        """Tokens the whole cache holds: no single request may ever need more."""
        return self.num_usable_blocks * self.block_size

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def get_block_ids(self, req_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(req_id, [])]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request, in whole blocks -> (blocks, num_tokens).

        Never the whole sequence: the last token is always recomputed, since its logits are
        what the step samples from. Requests asking for prompt logprobs skip the cache (every
        prompt position must go through the model). Takes no references (allocate_slots does).
        """
        if not self.enable_caching or request.wants_prompt_logprobs:
            return [], 0
        block_hashes = extend_block_hashes(request, self.block_size)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        computed_blocks = []
        for block_hash in block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            computed_blocks.append(block)
        return computed_blocks, len(computed_blocks) * self.block_size

    def record_prefix_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        """Counted by the scheduler when a request is admitted (not on retried lookups)."""
        self.prefix_cache_stats.num_queries += num_query_tokens
        self.prefix_cache_stats.num_hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       ) -> list[KVCacheBlock] | None:
        """Make room for `num_new_tokens` more tokens of the request -> its new blocks, or None
        (and no change at all) when the pool cannot provide them.

        Block table arithmetic (B = block_size = 4; `|` = block boundary, `.` = empty slot):

          admission with a prefix hit of 2 blocks, 6 new tokens:
            token:    0 1 2 3 | 4 5 6 7 | 8 9 10 11 | 12 13 . .
            block:    [  b4   ][  b9   ][   b11    ][  b12     ]
                      <- new_computed_blocks -><---- fresh from the pool ---->
            num_computed_tokens = 0 + 8, num_total_tokens = 14
            fresh = ceil(14 / 4) - 0 owned - 2 hits = 2

          a running request (owns b4 b9 b11 b12, 14 computed) takes a 4-token chunk:
            token:    ... | 12 13 14 15 | 16 17 . .
            block:    ... [    b12      ][  b3     ]      fresh = ceil(18 / 4) - 4 owned = 1

        Full blocks (every slot a known token: prompt or sampled) are then registered in the prefix
        cache. Blocks filled in this step count as cached already: their KV is written layer by
        layer before any attention reads it, so a request sharing them in the same step is safe.
        """
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.setdefault(request.req_id, [])
        num_computed_tokens = request.num_computed_tokens + num_new_computed_tokens
        num_total_tokens = num_computed_tokens + num_new_tokens
        num_required_blocks = -(-num_total_tokens // self.block_size)
        if num_required_blocks <= len(req_blocks) and not new_computed_blocks:  # decode within its last block
            num_known_tokens = min(num_total_tokens, len(request.all_token_ids))
            num_full_blocks = num_known_tokens // self.block_size
            if self.enable_caching and num_full_blocks > self.num_cached_blocks.get(request.req_id, 0):
                self._cache_full_blocks(request, num_known_tokens)   # it just filled one
            return []
        num_fresh_blocks = max(0, num_required_blocks - len(req_blocks) - len(new_computed_blocks))
        # Hits sitting in the free queue stop being allocatable once touched.
        num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_fresh_blocks > self.get_num_free_blocks() - num_free_hits:
            if not req_blocks:
                del self.req_to_blocks[request.req_id]
            return None
        self.block_pool.touch(new_computed_blocks)
        req_blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_fresh_blocks)
        req_blocks.extend(new_blocks)
        self._cache_full_blocks(request, min(num_total_tokens, request.num_tokens))
        return new_blocks

    def _cache_full_blocks(self, request: Request, num_known_tokens: int) -> None:
        if not self.enable_caching:
            return
        num_full_blocks = num_known_tokens // self.block_size
        num_cached = self.num_cached_blocks.get(request.req_id, 0)
        if num_full_blocks <= num_cached:
            return
        block_hashes = extend_block_hashes(request, self.block_size)
        self.block_pool.cache_full_blocks(self.req_to_blocks[request.req_id], block_hashes,
                                          num_cached, num_full_blocks)
        self.num_cached_blocks[request.req_id] = num_full_blocks

    def free(self, request: Request, discard_cached: bool = False) -> None:
        """Release the request's blocks, last block first (evicted first). `discard_cached`
        (the request failed mid-step) forgets the hashes of blocks nobody else holds."""
        blocks = self.req_to_blocks.pop(request.req_id, [])
        self.num_cached_blocks.pop(request.req_id, None)
        if discard_cached:
            self.block_pool.uncache_blocks(block for block in blocks if block.ref_cnt == 1)
        self.block_pool.free_blocks(reversed(blocks))

    def reassign_beams(self, slot_req_ids: list[str], parent_req_ids: list[str],
                       num_computed_tokens: int) -> list[tuple[int, int]]:
        """Beam search: slot i now continues the beam held by parent_req_ids[i] (every slot and
        parent holds exactly `num_computed_tokens` tokens of KV). Full blocks are shared (one more
        reference each); a partial last block goes to the first slot that takes that parent and is
        copied for the others (copy on write). Blocks of beams nobody continues are freed at once.
        Returns the (src, dst) block copies the runner makes before the next forward.

        Never short of blocks: each copy needs one fresh block, and each pruned beam frees its own
        partial last block first (as many pruned beams as parents taken twice)."""
        old_blocks = {req_id: self.req_to_blocks.pop(req_id, []) for req_id in slot_req_ids}
        old_cached = {req_id: self.num_cached_blocks.pop(req_id, 0) for req_id in slot_req_ids}
        num_full, has_partial = divmod(num_computed_tokens, self.block_size)
        new_blocks, to_copy, claimed = {}, [], set()
        for slot_id, parent_id in zip(slot_req_ids, parent_req_ids):
            parent_blocks = old_blocks[parent_id]
            blocks = parent_blocks[:num_full]
            self.block_pool.touch(blocks)
            if has_partial and parent_id in claimed:
                to_copy.append((slot_id, parent_blocks[num_full]))
            elif has_partial:
                claimed.add(parent_id)
                blocks.append(parent_blocks[num_full])
                self.block_pool.touch(blocks[-1:])
            new_blocks[slot_id] = blocks
            self.num_cached_blocks[slot_id] = min(old_cached[parent_id], num_full)
        for blocks in old_blocks.values():
            self.block_pool.free_blocks(reversed(blocks))
        copies = []
        for slot_id, source in to_copy:
            fresh = self.block_pool.get_new_blocks(1)[0]
            new_blocks[slot_id].append(fresh)
            copies.append((source.block_id, fresh.block_id))
        self.req_to_blocks.update(new_blocks)
        return copies

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
