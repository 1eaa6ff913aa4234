"""Chained block hashes: equal prefixes give equal hashes; an mm_hash changes exactly the blocks
its placeholder overlaps (and, through the chain, every later one); a salt changes all of them;
values do not depend on PYTHONHASHSEED."""

import os
import subprocess
import sys

from engine.kv_cache.block_hash import block_extra_keys, extend_block_hashes, hash_block_tokens
from engine.request import Request
from engine.sampling_params import SamplingParams
from vision.inputs import MultiModalItem, PlaceholderRange

PAD = 7


def _request(mm_hashes=(), cache_salt=None, num_tokens=24) -> Request:
    prompt = [100 + p for p in range(num_tokens)]
    items = []
    for index, mm_hash in enumerate(mm_hashes):  # images at [4, 10) and [14, 18)
        offset, length = [(4, 6), (14, 4)][index]
        prompt[offset:offset + length] = [PAD] * length
        items.append(MultiModalItem("image", mm_hash, PlaceholderRange(offset, length), b"",
                                    (1, 1, 1, 3), (1, 1, 1)))
    return Request("r", prompt, SamplingParams(), mm_items=items, cache_salt=cache_salt)


def test_hashes_chain_over_full_blocks_only():
    request = _request(num_tokens=23)
    hashes = list(extend_block_hashes(request, block_size=8))
    assert len(hashes) == 2  # the 7-token tail is not a full block
    assert hashes[0] == hash_block_tokens(None, request.all_token_ids[:8])
    assert hashes[1] == hash_block_tokens(hashes[0], request.all_token_ids[8:16])
    assert hashes[1] != hash_block_tokens(None, request.all_token_ids[8:16])  # parent matters
    request.append_output_token_id(5)
    assert extend_block_hashes(request, 8)[:2] == hashes and len(request.block_hashes) == 3


def test_extra_keys_name_every_overlapping_item_with_its_offset():
    items = _request(mm_hashes=("a", "b")).mm_items
    assert block_extra_keys(items, None, 0, 8) == (("mm", "a", -4),)
    assert block_extra_keys(items, None, 1, 8) == (("mm", "a", 4), ("mm", "b", -6))
    assert block_extra_keys(items, "tenant", 2, 8) == (("mm", "b", 2),)
    assert block_extra_keys(items, "tenant", 3, 8) == ()
    assert block_extra_keys(items, "tenant", 0, 8)[0] == ("salt", "tenant")


def test_a_different_mm_hash_changes_the_overlapping_block_and_every_later_one():
    base = extend_block_hashes(_request(mm_hashes=("a", "b")), 8)
    other_second_image = extend_block_hashes(_request(mm_hashes=("a", "c")), 8)
    assert base[0] == other_second_image[0]  # block 0 does not overlap image "b"/"c"
    assert base[1] != other_second_image[1] and base[2] != other_second_image[2]
    other_first_image = extend_block_hashes(_request(mm_hashes=("z", "b")), 8)
    assert all(x != y for x, y in zip(base, other_first_image))


def test_a_different_salt_changes_every_block():
    salted = extend_block_hashes(_request(cache_salt="x"), 8)
    assert extend_block_hashes(_request(cache_salt="x"), 8) == salted
    assert all(x != y for x, y in zip(salted, extend_block_hashes(_request(cache_salt="y"), 8)))
    assert all(x != y for x, y in zip(salted, extend_block_hashes(_request(), 8)))


def test_hashes_do_not_depend_on_the_python_hash_seed():
    code = ("from engine.kv_cache.block_hash import hash_block_tokens;"
            "print(hash_block_tokens(None, [1, 2, 3], (('mm', 'abc', 0), ('salt', 's'))).hex())")
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # differs from ours
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
    assert other == hash_block_tokens(None, [1, 2, 3], (("mm", "abc", 0), ("salt", "s"))).hex()
