"""EncoderCacheManager: shared entries are allocated once, budgets in embedding rows, lazy
eviction of unreferenced entries reported once through get_freed_mm_hashes."""

from engine.encoder_cache import EncoderCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from vision.inputs import MultiModalItem, PlaceholderRange


def _request(req_id: str, *items: tuple[str, int]) -> Request:
    mm_items, offset = [], 0
    for mm_hash, length in items:
        mm_items.append(MultiModalItem("image", mm_hash, PlaceholderRange(offset, length), b"",
                                       (1, 1, 1, 3), (1, 1, 1)))
        offset += length
    return Request(req_id, [7] * (offset + 1), SamplingParams(), mm_items=mm_items)


def test_one_image_shared_by_eight_requests_is_allocated_once():
    cache = EncoderCacheManager(cache_size=100)
    requests = [_request(f"r{i}", ("shared", 30)) for i in range(8)]
    assert not cache.check_and_update_cache(requests[0], 0)
    assert cache.can_allocate(requests[0], 0, encoder_compute_budget=100, num_embeds_to_schedule=0)
    cache.allocate(requests[0], 0)
    assert all(cache.check_and_update_cache(request, 0) for request in requests[1:])
    assert cache.num_referencing("shared") == 8 and cache.num_free_slots == 70
    for request in requests:
        cache.free(request)
    assert cache.num_referencing("shared") == 0 and cache.is_cached("shared")  # lazily kept
    assert cache.num_freeable_slots == 100 and cache.get_freed_mm_hashes() == []


def test_can_allocate_respects_compute_budget_and_planned_rows():
    cache = EncoderCacheManager(cache_size=50)
    request = _request("r", ("a", 30), ("b", 30))
    assert not cache.can_allocate(request, 0, encoder_compute_budget=29, num_embeds_to_schedule=0)
    assert cache.can_allocate(request, 0, 60, 0)
    assert not cache.can_allocate(request, 1, 30, num_embeds_to_schedule=30)  # 60 rows > 50


def test_unreferenced_entries_are_evicted_oldest_first_when_space_is_needed():
    cache = EncoderCacheManager(cache_size=60)
    first, second, third = _request("1", ("a", 30)), _request("2", ("b", 30)), _request("3", ("c", 40))
    for request in (first, second):
        assert cache.can_allocate(request, 0, 100, 0)
        cache.allocate(request, 0)
    assert not cache.can_allocate(third, 0, 100, 0)  # both still referenced
    cache.free(first)
    assert not cache.can_allocate(third, 0, 100, 0)  # 30 freeable < 40
    cache.free(second)
    assert cache.can_allocate(third, 0, 100, 0)
    assert cache.get_freed_mm_hashes() == ["a", "b"] and cache.get_freed_mm_hashes() == []
    cache.allocate(third, 0)
    assert cache.num_free_slots == 20 and not cache.is_cached("a")


def test_a_hit_on_an_unreferenced_entry_protects_it_again():
    cache = EncoderCacheManager(cache_size=30)
    first, again, other = _request("1", ("a", 30)), _request("2", ("a", 30)), _request("3", ("b", 30))
    cache.can_allocate(first, 0, 100, 0)
    cache.allocate(first, 0)
    cache.free(first)
    assert cache.check_and_update_cache(again, 0)
    assert not cache.can_allocate(other, 0, 100, 0) and cache.is_cached("a")
