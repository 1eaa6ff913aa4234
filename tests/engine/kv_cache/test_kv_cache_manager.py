"""KVCacheManager: block-table arithmetic (hand-computed counts), prefix hits (never the whole
sequence), all-or-nothing allocation, freeing, caching of full blocks."""

from engine.kv_cache.manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def _request(req_id: str, num_tokens: int, first_token: int = 100, **sampling) -> Request:
    return Request(req_id, [first_token + p for p in range(num_tokens)], SamplingParams(**sampling))


def test_allocate_slots_grows_the_block_table_by_ceil_division():
    manager = KVCacheManager(num_blocks=11, block_size=4)
    request = _request("a", 10)
    assert len(manager.allocate_slots(request, 6)) == 2          # ceil(6/4)
    request.num_computed_tokens = 6
    assert len(manager.allocate_slots(request, 4)) == 1          # ceil(10/4) - 2
    request.num_computed_tokens = 10
    request.append_output_token_id(1)
    assert manager.allocate_slots(request, 1) == []              # position 10 fits the third block
    assert manager.get_block_ids("a") == [1, 2, 3]
    assert manager.get_num_free_blocks() == 7 and manager.usage == 0.3


def test_allocation_is_all_or_nothing():
    manager = KVCacheManager(num_blocks=4, block_size=4)  # 3 usable blocks
    assert manager.allocate_slots(_request("a", 8), 8) is not None
    assert manager.allocate_slots(_request("b", 8), 8) is None
    assert "b" not in manager.req_to_blocks and manager.get_num_free_blocks() == 1


def test_prefix_hits_stop_one_token_short_of_the_whole_sequence():
    manager = KVCacheManager(num_blocks=20, block_size=4)
    first = _request("first", 12)
    manager.allocate_slots(first, 12)
    manager.free(first)
    same = _request("same", 12)
    blocks, num_tokens = manager.get_computed_blocks(same)
    assert num_tokens == 8 and [b.block_id for b in blocks] == [1, 2]  # (12 - 1) // 4 blocks
    longer = _request("longer", 13)
    assert manager.get_computed_blocks(longer)[1] == 12
    other = _request("other", 12, first_token=500)
    assert manager.get_computed_blocks(other) == ([], 0)
    assert manager.get_computed_blocks(_request("logprobs", 12, prompt_logprobs=1)) == ([], 0)


def test_hits_on_free_blocks_count_against_the_free_pool():
    manager = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable
    first = _request("first", 16)
    manager.allocate_slots(first, 16)
    manager.free(first)  # all 4 blocks free and cached
    second = _request("second", 16)
    blocks, num_hit = manager.get_computed_blocks(second)
    assert num_hit == 12
    new_blocks = manager.allocate_slots(second, 4, num_hit, blocks)
    assert len(new_blocks) == 1 and manager.get_block_ids("second") == [1, 2, 3, 4]
    assert manager.get_num_free_blocks() == 0
    manager.free(second)
    assert manager.get_num_free_blocks() == 4


def test_full_blocks_are_cached_once_their_tokens_are_known():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    request = _request("a", 6)
    manager.allocate_slots(request, 6)
    assert len(manager.block_pool.cached_blocks) == 1  # block 1 full; block 2 holds 2 of 4
    request.num_computed_tokens = 6
    request.append_output_token_id(9)
    request.append_output_token_id(9)  # (only as a test: two known tokens)
    manager.allocate_slots(request, 2)
    assert len(manager.block_pool.cached_blocks) == 2 and manager.num_cached_blocks["a"] == 2


def test_free_discarding_cache_forgets_unshared_blocks_only():
    manager = KVCacheManager(num_blocks=10, block_size=4)
    first = _request("first", 9)
    manager.allocate_slots(first, 9)
    second = _request("second", 9)
    blocks, num_hit = manager.get_computed_blocks(second)
    manager.allocate_slots(second, 9 - num_hit, num_hit, blocks)
    second_own = manager.req_to_blocks["second"][2:]
    manager.free(second, discard_cached=True)
    assert all(block.block_hash is not None for block in blocks)  # shared with "first": kept
    assert all(block.block_hash is None for block in second_own)
    manager.free(first)
    assert manager.get_num_free_blocks() == 9 and manager.reset_prefix_cache()
    stats = manager.prefix_cache_stats
    assert (stats.num_queries, stats.num_hits) == (0, 0)  # counted by the scheduler on admission


def test_reassign_beams_shares_full_blocks_and_copies_the_partial_one():
    """Beam search (engine/beam_search.py docstring): slots s0, s1 hold 6 tokens each (B = 4:
    one full block, one partial). Both continue s1's beam: the first slot taking it (s0) gets s1's
    partial block, the other a copy in a fresh block; s0's old blocks are freed at once, s1's full
    block is shared."""
    manager = KVCacheManager(num_blocks=11, block_size=4, enable_caching=False)
    for req_id in ("s0", "s1"):
        manager.allocate_slots(_request(req_id, 6), 6)
    assert manager.get_block_ids("s0") == [1, 2] and manager.get_block_ids("s1") == [3, 4]
    copies = manager.reassign_beams(["s0", "s1"], ["s1", "s1"], num_computed_tokens=6)
    # free queue before: 5..10, then s0's old blocks (2, 1: tail first); the copy takes its front
    assert manager.get_block_ids("s0") == [3, 4] and manager.get_block_ids("s1") == [3, 5]
    assert copies == [(4, 5)]
    pool = manager.block_pool
    assert pool.blocks[3].ref_cnt == 2 and pool.blocks[4].ref_cnt == 1
    assert manager.get_num_free_blocks() == 10 - 3
    for req_id in ("s0", "s1"):
        manager.free(_request(req_id, 6))
    assert manager.get_num_free_blocks() == 10


def test_reassign_beams_at_a_block_boundary_copies_nothing():
    manager = KVCacheManager(num_blocks=11, block_size=4, enable_caching=False)
    manager.allocate_slots(_request("s0", 8), 8)
    assert manager.reassign_beams(["s0", "s1", "s2"], ["s0", "s0", "s0"], num_computed_tokens=8) == []
    assert manager.get_block_ids("s1") == manager.get_block_ids("s2") == [1, 2]
    assert manager.block_pool.blocks[1].ref_cnt == 3 and manager.get_num_free_blocks() == 8
