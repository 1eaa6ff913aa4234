"""mm_hash: sha256 (first 16 bytes) over settings + frame bytes/shape, or settings + uuid (oracle: hashlib directly)."""

import hashlib

import numpy as np
import pytest

from vision.hashing import mm_hash


def test_matches_sha256_of_settings_shape_and_bytes():
    frames = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    expected = hashlib.sha256()
    expected.update(b'{"a":1,"b":[2,3]}')
    expected.update(b"\x00frames\x00|u1[2, 3, 4, 3]")
    expected.update(frames.tobytes())
    assert mm_hash(frames, {"b": [2, 3], "a": 1}) == expected.hexdigest()[:32]


def test_shape_settings_and_uuid_separate_items():
    frames = np.zeros((1, 4, 6, 3), np.uint8)
    base = mm_hash(frames, {"p": 14})
    assert mm_hash(frames.reshape(1, 6, 4, 3), {"p": 14}) != base
    assert mm_hash(frames, {"p": 16}) != base
    assert mm_hash(frames[:, ::-1], {"p": 14}) == base  # non-contiguous views hash by content
    assert mm_hash(None, {"p": 14}, uuid="x") == mm_hash(frames, {"p": 14}, uuid="x") != base
    assert mm_hash(None, {"p": 14}, uuid="x") != mm_hash(None, {"p": 16}, uuid="x")
    with pytest.raises(ValueError):
        mm_hash(None, {"p": 14})
    with pytest.raises(ValueError):
        mm_hash(frames, {"p": 14}, uuid="")
