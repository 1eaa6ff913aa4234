"""Each media refusal names the server flag that would allow it (what an operator needs to know)."""

import asyncio

import pytest

from vision.fetch import FetchConfig, MediaError, MediaFetcher


def refusal(config: FetchConfig, url: str) -> str:
    with pytest.raises(MediaError) as error:
        asyncio.run(MediaFetcher(config).fetch(url))
    return str(error.value)


def test_private_address_names_both_flags_that_allow_it():
    message = refusal(FetchConfig(), "http://127.0.0.1:9/x.png")
    assert "private or local" in message
    assert "--allow-private-media-addresses" in message and "--allowed-media-domains" in message


def test_domain_outside_the_allow_list_names_it():
    message = refusal(FetchConfig(allowed_media_domains=("example.org",)), "https://example.com/x.png")
    assert "example.com" in message and "--allowed-media-domains" in message


def test_file_urls_name_the_local_path_flag(tmp_path):
    assert "--allowed-local-media-path" in refusal(FetchConfig(), f"file://{tmp_path}/x.png")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "x.png"
    outside.write_bytes(b"x")
    assert "--allowed-local-media-path" in refusal(FetchConfig(allowed_local_media_path=str(allowed)),
                                                   f"file://{outside}")


def test_too_large_names_the_size_flag():
    assert "--max-media-bytes" in refusal(FetchConfig(max_bytes=3), "data:image/png;base64,AAAAAAAA")
