"""BlockPool: free-queue order (LRU, tail of a sequence evicted first), reference counts, the
hash -> block map and eviction, checked against hand-worked block ids."""

import pytest

from engine.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def _hash(index: int) -> bytes:
    return bytes([index]) * 32


def test_block_zero_is_reserved_and_never_handed_out():
    pool = BlockPool(num_blocks=5)
    assert pool.get_num_free_blocks() == 4 and pool.num_usable_blocks == 4
    assert [block.block_id for block in pool.get_new_blocks(4)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="asked for 1 blocks, 0 free"):
        pool.get_new_blocks(1)
    with pytest.raises(ValueError, match="not held"):
        pool.free_blocks([pool.null_block])


def test_free_queue_removes_from_the_middle_in_constant_time():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])
    queue.append(blocks[2])
    assert queue.block_ids() == [0, 1, 3, 4, 2] and queue.num_free_blocks == 5
    assert queue.popleft() is blocks[0]
    with pytest.raises(ValueError):
        queue.remove(blocks[0])


def test_freed_blocks_are_evicted_least_recently_freed_first_tail_of_a_sequence_first():
    pool = BlockPool(num_blocks=7)
    first, second = pool.get_new_blocks(3), pool.get_new_blocks(3)  # ids 1-3, 4-6
    pool.free_blocks(reversed(first))
    pool.free_blocks(reversed(second))
    assert pool.free_queue.block_ids() == [3, 2, 1, 6, 5, 4]
    assert pool.get_usage() == 0.0


def test_ref_counts_touch_and_cached_hits_leaving_the_free_queue():
    pool = BlockPool(num_blocks=6)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [_hash(1), _hash(2)], num_cached_blocks=0, num_full_blocks=2)
    assert pool.get_cached_block(_hash(2)) is blocks[1]
    pool.touch(blocks)  # a second request shares both
    assert [block.ref_cnt for block in blocks] == [2, 2]
    pool.free_blocks(reversed(blocks))
    assert pool.get_num_free_blocks() == 3 and pool.get_usage() == pytest.approx(2 / 5)
    pool.free_blocks(reversed(blocks))
    assert pool.get_num_free_blocks() == 5
    assert pool.get_cached_block(_hash(1)) is blocks[0]  # free but still cached
    pool.touch([blocks[0]])  # a hit on a free block takes it out of the queue
    assert blocks[0].ref_cnt == 1 and 1 not in pool.free_queue.block_ids()


def test_evicting_a_cached_block_drops_its_hash():
    pool = BlockPool(num_blocks=3)
    block = pool.get_new_blocks(1)[0]
    pool.cache_full_blocks([block], [_hash(7)], 0, 1)
    pool.free_blocks([block])
    reused = pool.get_new_blocks(2)  # the free queue is [2, 1]: block 1 is reused second
    assert block in reused and block.block_hash is None
    assert pool.get_cached_block(_hash(7)) is None and not pool.cached_blocks


def test_a_hash_already_cached_keeps_its_first_block():
    pool = BlockPool(num_blocks=4)
    first, duplicate = pool.get_new_blocks(2)
    pool.cache_full_blocks([first], [_hash(1)], 0, 1)
    pool.cache_full_blocks([duplicate], [_hash(1)], 0, 1)
    assert pool.get_cached_block(_hash(1)) is first and duplicate.block_hash is None
    pool.uncache_blocks([first])
    assert pool.get_cached_block(_hash(1)) is None


def test_caching_disabled_caches_nothing():
    pool = BlockPool(num_blocks=4, enable_caching=False)
    blocks = pool.get_new_blocks(1)
    pool.cache_full_blocks(blocks, [_hash(1)], 0, 1)
    assert pool.get_cached_block(_hash(1)) is None


def test_reset_prefix_cache_only_when_no_block_is_in_use():
    pool = BlockPool(num_blocks=4)
    blocks = pool.get_new_blocks(1)
    pool.cache_full_blocks(blocks, [_hash(3)], 0, 1)
    assert pool.reset_prefix_cache() is False
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(_hash(3)) is None and blocks[0].block_hash is None
