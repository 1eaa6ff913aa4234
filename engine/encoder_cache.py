"""EncoderCacheManager: the scheduler's book of vision-embedding rows, keyed by mm_hash.
Caller: engine.scheduler only. The runner holds the actual embeddings (mm_hash -> tensor) and
drops the ones named in SchedulerOutput.free_encoder_mm_hashes.

An entry is *referenced* while some request still has placeholder tokens to compute from it, so
one image shared by 8 requests is encoded once and held once. An unreferenced entry stays cached
(another request may still hit it) until space is needed: it is then evicted, least recently
released first, and its mm_hash reported once through `get_freed_mm_hashes`.
Capacity and sizes are in embedding rows (= placeholder tokens).
"""

from __future__ import annotations

from collections import OrderedDict

from engine.request import Request


class EncoderCacheManager:
    def __init__(self, cache_size: int) -> None:
        if cache_size < 1:
            raise ValueError(f"encoder cache size must be positive, got {cache_size}")
        self.cache_size = cache_size
        self.num_free_slots = cache_size       # rows held by no entry
        self.num_freeable_slots = cache_size   # rows free or held by unreferenced entries
        self.entry_sizes: dict[str, int] = {}
        self.referenced_by: dict[str, set[str]] = {}          # mm_hash -> req_ids
        self.unreferenced: OrderedDict[str, int] = OrderedDict()  # eviction order -> size
        self.freed_mm_hashes: list[str] = []

    def is_cached(self, mm_hash: str) -> bool:
        return mm_hash in self.entry_sizes

    def check_and_update_cache(self, request: Request, input_id: int) -> bool:
        """True (and the request now references it) when the item's embedding is cached."""
        mm_hash = request.mm_items[input_id].mm_hash
        if mm_hash not in self.entry_sizes:
            return False
        refs = self.referenced_by[mm_hash]
        if not refs:
            self.num_freeable_slots -= self.unreferenced.pop(mm_hash)
        refs.add(request.req_id)
        return True

    def can_allocate(self, request: Request, input_id: int, encoder_compute_budget: int,
                     num_embeds_to_schedule: int) -> bool:
        """Can the item be encoded this step, next to `num_embeds_to_schedule` rows planned but
        not yet allocated? May evict unreferenced entries to make room."""
        num_embeds = request.mm_items[input_id].placeholder.length
        if num_embeds > encoder_compute_budget:
            return False
        num_needed = num_embeds + num_embeds_to_schedule
        if num_needed <= self.num_free_slots:
            return True
        if num_needed > self.num_freeable_slots:
            return False
        while num_needed > self.num_free_slots:
            mm_hash, size = self.unreferenced.popitem(last=False)
            del self.entry_sizes[mm_hash], self.referenced_by[mm_hash]
            self.num_free_slots += size
            self.freed_mm_hashes.append(mm_hash)
        return True

    def allocate(self, request: Request, input_id: int) -> None:
        item = request.mm_items[input_id]
        if item.mm_hash in self.entry_sizes:
            raise ValueError(f"encoder cache already holds {item.mm_hash}")
        self.entry_sizes[item.mm_hash] = item.placeholder.length
        self.referenced_by[item.mm_hash] = {request.req_id}
        self.num_free_slots -= item.placeholder.length
        self.num_freeable_slots -= item.placeholder.length

    def free_encoder_input(self, request: Request, input_id: int) -> None:
        """The request no longer needs this item (its placeholder is computed, or it left)."""
        mm_hash = request.mm_items[input_id].mm_hash
        refs = self.referenced_by.get(mm_hash)
        if refs is None or request.req_id not in refs:
            return
        refs.discard(request.req_id)
        if not refs:
            self.unreferenced[mm_hash] = self.entry_sizes[mm_hash]
            self.num_freeable_slots += self.entry_sizes[mm_hash]

    def free(self, request: Request) -> None:
        for input_id in range(len(request.mm_items)):
            self.free_encoder_input(request, input_id)

    def get_freed_mm_hashes(self) -> list[str]:
        freed, self.freed_mm_hashes = self.freed_mm_hashes, []
        return freed

    def num_referencing(self, mm_hash: str) -> int:
        return len(self.referenced_by.get(mm_hash, ()))
