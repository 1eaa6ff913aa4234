"""Media URL -> bytes, under the server's size, time and network rules. Callers: `app.routes.chat`
(async `fetch`, after `MultiModalLimits.check_counts`) and the offline `LLM` (`fetch_sync`).

Schemes: `data:` (base64 or percent-encoded), `http(s):` (streamed with httpx), `file:` (only under
--allowed-local-media-path). Network rules for http(s), applied to the first URL and to every
redirect hop:
  - with --allowed-media-domains set, only those hosts (exact match);
  - the host is resolved ONCE and the connection goes to that address (Host header and TLS SNI keep
    the name), so a DNS answer cannot change between the check and the connect (rebinding);
  - loopback, private, link-local (cloud metadata 169.254.169.254), multicast and other non-global
    addresses are refused unless the host is in the allowed domains or private addresses are allowed.
The byte cap is checked against Content-Length and again while streaming (the body is never read
whole before counting). Every failure is a MediaError whose message can go to the user.
"""

from __future__ import annotations

import asyncio
import binascii
import concurrent.futures
import ipaddress
import os
import re
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import httpx

from vision.inputs import MediaError

__all__ = ["FetchConfig", "MediaError", "MediaFetcher", "data_url_head", "decode_data_url", "is_data_url"]


@dataclass(frozen=True)
class FetchConfig:
    allowed_local_media_path: str | None = None  # --allowed-local-media-path; None: file:// refused
    allowed_media_domains: tuple[str, ...] = ()  # --allowed-media-domains; empty: any public host
    allow_private_addresses: bool = False
    connect_timeout: float = 5.0  # seconds
    total_timeout: float = 30.0  # seconds for one fetch, redirects included
    max_bytes: int = 64 * 1024 * 1024  # per item, after content decoding
    max_redirects: int = 3
    max_concurrent: int = 16  # http(s) fetches in flight per fetcher

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "total_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FetchConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_bytes", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ValueError(f"FetchConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise ValueError(f"FetchConfig.max_redirects must be >= 0, got {self.max_redirects}")
        domains = tuple(d.strip().lower().rstrip(".") for d in self.allowed_media_domains if d.strip())
        object.__setattr__(self, "allowed_media_domains", domains)


@dataclass(frozen=True)
class _Target:
    url: httpx.URL  # with the host replaced by the resolved address
    host: str  # the name, for the Host header and SNI
    host_header: str


class MediaFetcher:
    """Stateless apart from per-event-loop concurrency slots; share one per server."""

    def __init__(self, config: FetchConfig):
        self.config = config
        self._slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def fetch(self, url: str) -> bytes:
        scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
        if scheme == "data":  # ~2 ms per 800 KB of base64: kept off the event loop when large
            if len(url) < 64 * 1024:
                return decode_data_url(url, self.config.max_bytes)
            return await asyncio.to_thread(decode_data_url, url, self.config.max_bytes)
        if scheme == "file":
            return await asyncio.to_thread(self._read_local, url)
        if scheme not in ("http", "https"):
            raise MediaError("unsupported media URL: expected http(s)://, data: or file:// URL")
        async with self._slot():
            try:
                async with asyncio.timeout(self.config.total_timeout):
                    return await self._fetch_http(url)
            except TimeoutError:
                raise MediaError(f"fetching the media URL timed out after {self.config.total_timeout:g} s") from None

    def fetch_sync(self, url: str) -> bytes:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.fetch(url))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # called from a running loop
            return pool.submit(asyncio.run, self.fetch(url)).result()

    def _slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._slots:
            self._slots[loop] = asyncio.Semaphore(self.config.max_concurrent)
        return self._slots[loop]

    async def _fetch_http(self, url: str) -> bytes:
        timeout = httpx.Timeout(self.config.total_timeout, connect=self.config.connect_timeout)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            for _ in range(self.config.max_redirects + 1):
                target = await self._checked_target(url)
                extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
                try:
                    async with client.stream("GET", target.url, headers={"Host": target.host_header},
                                             extensions=extensions) as response:
                        if not response.is_redirect:
                            return await self._read_body(response, target.host)
                        url = urljoin(url, response.headers.get("location", ""))
                except httpx.TimeoutException:
                    raise MediaError(f"fetching media from {target.host} timed out") from None
                except (httpx.InvalidURL, UnicodeError):  # e.g. a Location that httpx cannot parse
                    raise MediaError(f"the media server {target.host} sent a malformed URL") from None
                except httpx.HTTPError:
                    raise MediaError(f"could not fetch media from {target.host} (network error)") from None
        raise MediaError(f"too many redirects (more than {self.config.max_redirects})")

    async def _read_body(self, response: httpx.Response, host: str) -> bytes:
        if response.status_code != 200:
            raise MediaError(f"could not fetch media from {host}: HTTP {response.status_code}")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.config.max_bytes:
            raise self._too_large()
        chunks, num_bytes = [], 0
        async for chunk in response.aiter_bytes():
            num_bytes += len(chunk)
            if num_bytes > self.config.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    async def _checked_target(self, url: str) -> _Target:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise MediaError("malformed media URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise MediaError("media URLs (and their redirects) must be http(s) URLs with a host")
        host = parsed.host.lower().rstrip(".")
        domains = self.config.allowed_media_domains
        if domains and host not in domains:
            raise MediaError(f"fetching media from {host} is not allowed on this server (not in its "
                              f"--allowed-media-domains)")
        is_exempt = self.config.allow_private_addresses or host in domains
        address = await _resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80), is_exempt)
        return _Target(url=parsed.copy_with(host=address), host=host, host_header=parsed.netloc.decode("ascii"))

    def _read_local(self, url: str) -> bytes:
        root = self.config.allowed_local_media_path
        if not root:
            raise MediaError("file:// media URLs are not allowed on this server (it was started without "
                             "--allowed-local-media-path)")
        parsed = urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError("file:// media URLs must not name a remote host")
        path = Path(os.path.realpath(unquote(parsed.path)))  # symlinks and '..' resolved
        if not path.is_relative_to(Path(os.path.realpath(root))):
            raise MediaError("the file:// media URL is outside the allowed local media path "
                             "(--allowed-local-media-path)")
        if not path.is_file():
            raise MediaError("the file:// media URL does not name an existing file")
        if path.stat().st_size > self.config.max_bytes:
            raise self._too_large()
        with open(path, "rb") as f:
            data = f.read(self.config.max_bytes + 1)
        if len(data) > self.config.max_bytes:
            raise self._too_large()
        return data

    def _too_large(self) -> MediaError:
        return too_large(self.config.max_bytes)


def too_large(max_bytes: int) -> MediaError:
    return MediaError(f"the media is larger than this server's limit of {max_bytes} bytes (--max-media-bytes)")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """`data:[<mediatype>][;base64],<payload>` -> bytes ("data:image;base64,..." is fine)."""
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise MediaError("malformed data URL: expected data:<type>;base64,<data>")
    if header.split(";")[-1].strip().lower() == "base64":
        data = _decode_base64(unquote(payload) if "%" in payload else payload, max_bytes)
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise MediaError("the data URL is empty")
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    return data


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def data_url_head(url: str, num_bytes: int = 48 * 1024) -> bytes:
    """At most the first num_bytes of a base64 data URL's content, decoded: enough for an image
    header (its size) without decoding the rest. b"" when the URL is not plain base64."""
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep or header.split(";")[-1].strip().lower() != "base64" or "%" in payload[: num_bytes * 2]:
        return b""
    text = payload[: num_bytes // 3 * 4 * 2]  # room for whitespace; trimmed to whole quanta below
    if any(char in text for char in _ASCII_WHITESPACE):
        text = text.translate(_STRIP_WHITESPACE)
    text = text[: min(len(text), num_bytes // 3 * 4) // 4 * 4]
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return b""


# What `\s` matches among ASCII characters: whitespace anywhere in a base64 payload is ignored.
_ASCII_WHITESPACE = "".join(chr(c) for c in range(128) if chr(c).isspace())


def _decode_base64(payload: str, max_bytes: int) -> bytes:
    """Base64 text -> bytes; whitespace ignored, missing padding added, any other stray
    character refused. One C pass over the payload (an 800 KB image: ~2 ms, where a regex
    whitespace strip alone took 12 ms on the API process's event loop)."""
    if not payload.isascii():  # only Unicode whitespace could still make it valid: the slow rule
        payload = re.sub(r"\s+", "", payload)
    elif any(char in payload for char in _ASCII_WHITESPACE):  # each test is a memchr-speed scan
        payload = payload.translate(_STRIP_WHITESPACE)
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise MediaError(f"the media is larger than this server's limit of {max_bytes} bytes")
    try:
        # strict_mode refuses what the alphabet lacks and '=' anywhere but the end.
        return binascii.a2b_base64(payload + "=" * (-len(payload) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data URL does not hold valid base64") from None


_STRIP_WHITESPACE = str.maketrans("", "", _ASCII_WHITESPACE)


async def _resolve(host: str, port: int, is_exempt: bool) -> str:
    """One address for `host`; MediaError if any address it resolves to is non-public (unless exempt)."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise MediaError(f"could not resolve the media host {host}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise MediaError(f"could not resolve the media host {host}")
    if not is_exempt and not all(_is_public(address) for address in addresses):
        raise MediaError(f"refusing to fetch media from {host}: it is a private or local network address "
                         f"(a server started with --allow-private-media-addresses, or with {host} in "
                         f"--allowed-media-domains, fetches it)")
    return str(addresses[0])


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast
