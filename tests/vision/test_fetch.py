"""MediaFetcher against a local HTTP server started here on 127.0.0.1 (never an external address):
schemes, network rules on every redirect hop, byte caps (declared and while streaming), file:// jail."""

import asyncio
import base64
import http.server
import os
import threading
import time

import pytest

from vision import fetch as fetch_module
from vision.fetch import FetchConfig, MediaError, MediaFetcher

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        port = self.server.server_address[1]
        routes = {
            "/media": lambda: self._send(PAYLOAD),
            "/host": lambda: self._send(self.headers["Host"].encode()),
            "/redirect": lambda: self._redirect("/media"),
            "/redirect-chain-3": lambda: self._redirect("/redirect-chain-2"),
            "/redirect-chain-2": lambda: self._redirect("/redirect"),
            "/loop": lambda: self._redirect("/loop"),
            "/to-localhost": lambda: self._redirect(f"http://localhost:{port}/media"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-file": lambda: self._redirect("file:///etc/passwd"),
            "/declared-huge": self._declared_huge,
            "/endless": self._endless,
        }
        routes.get(self.path, lambda: self._send(b"missing", status=404))()

    def _send(self, body, status=200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _declared_huge(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        self.wfile.write(b"x" * 100)
        self.server.huge_served = True

    def _endless(self):  # chunked, no Content-Length: only counting while streaming can stop it
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for _ in range(2000):
                self.wfile.write(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
                self.server.endless_chunks += 1
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.endless_chunks = 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    httpd.shutdown()
    httpd.server_close()


def _fetcher(**kwargs):
    return MediaFetcher(FetchConfig(**{"total_timeout": 10.0, **kwargs}))


def test_http_fetch_with_private_addresses_allowed(server):
    base, _ = server
    assert _fetcher(allow_private_addresses=True).fetch_sync(f"{base}/media") == PAYLOAD
    assert asyncio.run(_fetcher(allowed_media_domains=("127.0.0.1",)).fetch(f"{base}/media")) == PAYLOAD


def test_private_and_local_addresses_are_refused(server):
    base, httpd = server
    port = httpd.server_address[1]
    fetcher = _fetcher()
    for url in [f"{base}/media", f"http://localhost:{port}/media", "http://169.254.169.254/latest/meta-data/",
                "http://10.0.0.1/x", "http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/x"]:
        with pytest.raises(MediaError, match="private or local"):
            fetcher.fetch_sync(url)


def test_allowed_domains_are_an_allowlist(server):
    base, _ = server
    with pytest.raises(MediaError, match="not allowed"):
        _fetcher(allowed_media_domains=("example.com",), allow_private_addresses=True).fetch_sync(f"{base}/media")


def test_host_name_is_kept_while_connecting_to_the_resolved_address(server):
    _, httpd = server
    port = httpd.server_address[1]
    body = _fetcher(allowed_media_domains=("localhost",)).fetch_sync(f"http://LocalHost:{port}/host")
    assert body.decode().lower() == f"localhost:{port}"


def test_redirects_are_followed_and_every_hop_checked(server):
    base, _ = server
    allowed_ip_only = _fetcher(allowed_media_domains=("127.0.0.1",))
    assert allowed_ip_only.fetch_sync(f"{base}/redirect") == PAYLOAD
    assert allowed_ip_only.fetch_sync(f"{base}/redirect-chain-3") == PAYLOAD
    with pytest.raises(MediaError, match="too many redirects"):
        _fetcher(allowed_media_domains=("127.0.0.1",), max_redirects=2).fetch_sync(f"{base}/redirect-chain-3")
    with pytest.raises(MediaError, match="too many redirects"):
        allowed_ip_only.fetch_sync(f"{base}/loop")
    with pytest.raises(MediaError, match="not allowed"):
        allowed_ip_only.fetch_sync(f"{base}/to-localhost")
    with pytest.raises(MediaError, match="http"):
        allowed_ip_only.fetch_sync(f"{base}/to-file")


def test_a_redirect_into_a_private_network_is_refused(server, monkeypatch):
    # Pretend the test server's address is public, so the first hop passes the default rules and the
    # redirect to the cloud-metadata address is what must be stopped.
    base, _ = server
    is_public = fetch_module._is_public
    monkeypatch.setattr(fetch_module, "_is_public",
                        lambda address: str(address) == "127.0.0.1" or is_public(address))
    fetcher = _fetcher()
    assert fetcher.fetch_sync(f"{base}/media") == PAYLOAD
    with pytest.raises(MediaError, match="169.254.169.254: it is a private or local"):
        fetcher.fetch_sync(f"{base}/to-metadata")


def test_http_errors_are_media_errors(server):
    base, _ = server
    with pytest.raises(MediaError, match="HTTP 404"):
        _fetcher(allow_private_addresses=True).fetch_sync(f"{base}/nope")
    with pytest.raises(MediaError, match="unsupported media URL"):
        _fetcher().fetch_sync("ftp://example.com/a.png")


def test_declared_length_over_cap_is_refused_before_reading(server):
    base, _ = server
    with pytest.raises(MediaError, match="larger than this server's limit of 1000 bytes"):
        _fetcher(allow_private_addresses=True, max_bytes=1000).fetch_sync(f"{base}/declared-huge")
    with pytest.raises(MediaError, match="limit of 10000 bytes"):
        _fetcher(allow_private_addresses=True, max_bytes=10_000).fetch_sync(f"{base}/media")
    assert _fetcher(allow_private_addresses=True, max_bytes=len(PAYLOAD)).fetch_sync(f"{base}/media") == PAYLOAD


def test_byte_cap_is_enforced_while_streaming(server):
    base, httpd = server
    start = time.perf_counter()
    with pytest.raises(MediaError, match="larger than"):
        _fetcher(allow_private_addresses=True, max_bytes=1_000_000).fetch_sync(f"{base}/endless")
    assert time.perf_counter() - start < 5
    time.sleep(0.2)
    assert httpd.endless_chunks < 2000  # the client hung up long before the 128 MiB were sent


def test_fetch_sync_inside_a_running_loop(server):
    base, _ = server

    async def call_sync():
        return _fetcher(allow_private_addresses=True).fetch_sync(f"{base}/media")

    assert asyncio.run(call_sync()) == PAYLOAD


def test_concurrent_fetches_share_the_slots(server):
    base, _ = server
    fetcher = _fetcher(allow_private_addresses=True, max_concurrent=2)

    async def many():
        return await asyncio.gather(*[fetcher.fetch(f"{base}/media") for _ in range(6)])

    assert asyncio.run(many()) == [PAYLOAD] * 6


def test_data_urls():
    fetcher = _fetcher(max_bytes=100)
    encoded = base64.b64encode(b"\x89PNG fake bytes").decode()
    assert fetcher.fetch_sync(f"data:image/png;base64,{encoded}") == b"\x89PNG fake bytes"
    assert fetcher.fetch_sync(f"data:image;base64,{encoded}") == b"\x89PNG fake bytes"
    assert fetcher.fetch_sync(f"data:image/png;base64,{encoded[:8]}\n{encoded[8:].rstrip('=')}") == b"\x89PNG fake bytes"
    assert fetcher.fetch_sync("data:text/plain,hello%20world") == b"hello world"
    for bad, message in [("data:image/png;base64,", "empty"), ("data:image/png;base64,@@@@", "valid base64"),
                         ("data:image/png;base64", "malformed"),
                         ("data:image/png;base64," + base64.b64encode(b"x" * 101).decode(), "limit of 100")]:
        with pytest.raises(MediaError, match=message):
            fetcher.fetch_sync(bad)


def test_file_urls_stay_inside_the_allowed_path(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(b"cat")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.txt", allowed / "link.png")
    fetcher = _fetcher(allowed_local_media_path=str(allowed), max_bytes=5)
    assert fetcher.fetch_sync(f"file://{allowed}/cat.png") == b"cat"
    assert fetcher.fetch_sync(f"file://localhost{allowed}/sub/../cat.png") == b"cat"
    for url in [f"file://{allowed}/../secret.txt", f"file://{allowed}/link.png", "file:///etc/passwd",
                f"file://{allowed}/%2E%2E/secret.txt"]:
        with pytest.raises(MediaError, match="outside the allowed") as info:
            fetcher.fetch_sync(url)
        assert str(allowed) not in str(info.value)
    with pytest.raises(MediaError, match="existing file"):
        fetcher.fetch_sync(f"file://{allowed}/missing.png")
    (allowed / "big.png").write_bytes(b"123456")
    with pytest.raises(MediaError, match="limit of 5 bytes"):
        fetcher.fetch_sync(f"file://{allowed}/big.png")
    with pytest.raises(MediaError, match="not allowed"):
        _fetcher().fetch_sync(f"file://{allowed}/cat.png")
    with pytest.raises(MediaError, match="remote host"):
        fetcher.fetch_sync(f"file://otherhost{allowed}/cat.png")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_bytes"):
        FetchConfig(max_bytes=0)
    with pytest.raises(ValueError, match="total_timeout"):
        FetchConfig(total_timeout=0)
    assert FetchConfig(allowed_media_domains=("Example.COM.", " ")).allowed_media_domains == ("example.com",)
