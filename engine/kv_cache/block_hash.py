"""Chained hashes of full KV blocks: the prefix-cache key. Caller: engine.kv_cache.manager.

The hash of block i covers everything that determines its KV:

    hash_i = sha256(msgpack([hash_{i-1}, token_ids of block i, extra_keys_i]))

so equal hashes mean equal prefixes. Placeholder token ids are the same for every image, so the
extra keys fold in the `mm_hash` of every multimodal item whose placeholder overlaps the block
(with the block start's offset inside the item), and the request's `cache_salt` into block 0,
which through the chain separates every later block too.

sha256 over msgpack bytes is stable across processes and PYTHONHASHSEED values, unlike `hash()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec

from engine.request import Request
from vision.inputs import MultiModalItem

BlockHash = bytes

_ENCODER = msgspec.msgpack.Encoder()
ROOT_HASH: BlockHash = hashlib.sha256(b"vlserve prefix cache root").digest()


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_keys: tuple = ()) -> BlockHash:
    payload = _ENCODER.encode((parent_hash or ROOT_HASH, list(token_ids), extra_keys))
    return hashlib.sha256(payload).digest()


def block_extra_keys(mm_items: Sequence[MultiModalItem], cache_salt: str | None,
                     block_index: int, block_size: int) -> tuple:
    """Keys besides the token ids for the block covering [block_index*B, (block_index+1)*B)."""
    start, end = block_index * block_size, (block_index + 1) * block_size
    keys: list[tuple] = []
    if block_index == 0 and cache_salt is not None:
        keys.append(("salt", cache_salt))
    for item in mm_items:  # sorted by placeholder.offset
        offset, length = item.placeholder.offset, item.placeholder.length
        if offset >= end:
            break
        if offset + length > start:
            # start - offset: where this block starts inside the item (negative: item starts later).
            keys.append(("mm", item.mm_hash, start - offset))
    return tuple(keys)


def extend_block_hashes(request: Request, block_size: int) -> list[BlockHash]:
    """Append the hashes of the request's full blocks that have none yet; returns them all."""
    hashes = request.block_hashes
    parent = hashes[-1] if hashes else None
    for block_index in range(len(hashes), request.num_tokens // block_size):
        token_ids = request.all_token_ids[block_index * block_size:(block_index + 1) * block_size]
        extra_keys = block_extra_keys(request.mm_items, request.cache_salt, block_index, block_size)
        parent = hash_block_tokens(parent, token_ids, extra_keys)
        hashes.append(parent)
    return hashes
