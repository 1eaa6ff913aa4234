"""--limit-mm-per-prompt parsing (vLLM's three forms) and the checks made before any fetch."""

import pytest

from vision.limits import MultiModalLimits


@pytest.mark.parametrize("value", ["image=5,video=2", " image = 5 , video=2", '{"image": 5, "video": 2}',
                                   {"image": 5, "video": 2},
                                   '{"image": {"count": 5}, "video": {"count": 2, "num_frames": 32}}'])
def test_forms_agree_on_counts(value):
    limits = MultiModalLimits.parse(value)
    assert (limits.max_items("image"), limits.max_items("video")) == (5, 2)


def test_unset_modalities_default_to_999():
    assert MultiModalLimits.parse(None).max_items("image") == 999
    assert MultiModalLimits.parse("").max_items("video") == 999
    assert MultiModalLimits.parse("image=3").max_items("video") == 999


def test_check_counts_names_modality_and_limit():
    limits = MultiModalLimits.parse("image=5,video=0")
    limits.check_counts({"image": 5, "video": 0})
    with pytest.raises(ValueError, match=r"at most 5 image\(s\) per prompt, got 6"):
        limits.check_counts({"image": 6})
    with pytest.raises(ValueError, match="video inputs are disabled"):
        limits.check_counts({"video": 1})
    with pytest.raises(ValueError, match="unsupported media type 'audio'"):
        limits.check_counts({"audio": 1})


def test_object_form_bounds_sizes():
    limits = MultiModalLimits.parse(
        '{"image": {"count": 5, "width": 512, "height": 256}, "video": {"count": 1, "num_frames": 32}}')
    assert limits.limit_sizes() == {"image": {"width": 512, "height": 256}, "video": {"num_frames": 32}}
    limits.check_size("image", width=512, height=256)
    with pytest.raises(ValueError, match="image height 257 exceeds"):
        limits.check_size("image", width=10, height=257)
    with pytest.raises(ValueError, match="video num_frames 33 exceeds"):
        limits.check_size("video", width=4000, height=4000, num_frames=33)
    limits.check_size("video", width=4000, height=4000, num_frames=32)


def test_round_trip_through_config_fields():
    limits = MultiModalLimits.parse('{"image": {"count": 2, "width": 64}, "video": 1}')
    rebuilt = MultiModalLimits.from_config_fields(limits.limit_per_prompt(), limits.limit_sizes())
    assert rebuilt == limits


@pytest.mark.parametrize("value, message", [
    ("audio=1", "unknown modality 'audio'"),
    ("image", "modality=count"),
    ("image=-1", "must be >= 0"),
    ("image=two", "must be an integer"),
    ('{"image": 5', "invalid JSON"),
    ("[1, 2]", "modality=count"),
    ('{"image": {"count": 1, "depth": 3}}', "unknown key"),
    ('{"image": {"count": 1, "width": 0}}', "must be positive"),
    ('{"image": true}', "must be an integer"),
])
def test_bad_values_name_the_flag(value, message):
    with pytest.raises(ValueError, match=message) as info:
        MultiModalLimits.parse(value)
    assert "--limit-mm-per-prompt" in str(info.value)
