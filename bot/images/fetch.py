"""Fetching an image from a link somebody posted, without letting the link reach inside our network.

Only http and https; at most 5 redirects, each hop checked again; every address a host name resolves
to must be public (loopback, private, link-local, multicast, reserved, and their IPv4-mapped, 6to4
and Teredo forms are refused), and the connection goes to exactly the addresses that were checked:
the check happens inside the resolver aiohttp connects with, so there is no second lookup to race.
Connect and total timeouts apply, and the body is read in chunks and cut at the byte limit.
`download` is the one redirect-following download loop: links people post go through `fetch`, files
on a platform (Slack's, with its token) through an adapter's own hop rule.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


class FetchRefused(Exception):
    """The link can't be used; the message names it and says why."""


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = 20 * 1024 * 1024
    connect_timeout: float = 5.0
    total_timeout: float = 20.0
    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()


def short(url: str, limit: int = 80) -> str:
    """A link shortened for a chat message."""
    return url if len(url) <= limit else url[: limit - 1] + "…"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found = [ip.ipv4_mapped, ip.sixtofour]
    if ip.teredo:
        found.extend(ip.teredo)
    # IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) also carry an IPv4 address in their low bits.
    if int(ip) >> 32 == 0 or ip in ipaddress.IPv6Network("64:ff9b::/96"):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is an ordinary address on the internet (and so is every IPv4 address inside it)."""
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return all(is_public(v4) for v4 in _embedded_ipv4(ip))
    return True


class AddressPolicy:
    """Which addresses links may lead to."""

    def __init__(self, allow_private: bool = False, allowed_hosts: Iterable[str] = ()):
        self.allow_private = allow_private
        self.allowed_hosts = {host.strip("[]").lower() for host in allowed_hosts}

    def check(self, url: str, host: str, address: str) -> None:
        """Raise `FetchRefused` unless `host`, resolved to `address`, may be fetched."""
        if self.allow_private or host.lower() in self.allowed_hosts or address.lower() in self.allowed_hosts:
            return
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not is_public(ip):
            raise FetchRefused(f"I won't fetch {short(url)}: it leads to a private or local network address ({address}).")


class _CheckingResolver(AbstractResolver):
    """Resolves a name and refuses it if any of its addresses is not allowed."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy
        self.url = ""  # the link being fetched, for the refusal message

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        except socket.gaierror:
            raise FetchRefused(f"I couldn't fetch {short(self.url)}: the host name {host} does not resolve.") from None
        results: list[ResolveResult] = []
        for found_family, _, proto, _, sockaddr in infos:
            address = str(sockaddr[0])
            self.policy.check(self.url, host, address)
            results.append(
                {"hostname": host, "host": address, "port": port, "family": found_family, "proto": proto, "flags": socket.AI_NUMERICHOST}
            )
        return results

    async def close(self) -> None:
        return None


def _literal_address(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def file_name(url: str) -> str:
    """The last path segment of `url`, for naming the image in messages."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    return name[:100] or "image"


async def fetch(url: str, limits: FetchLimits) -> bytes:
    """The body of `url`, within the limits, or `FetchRefused` saying which link and why."""
    policy = AddressPolicy(limits.allow_private, limits.allowed_hosts)
    resolver = _CheckingResolver(policy)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, family=socket.AF_UNSPEC)
    timeout = aiohttp.ClientTimeout(total=limits.total_timeout, sock_connect=limits.connect_timeout)

    def hop(next_url: str) -> Mapping[str, str]:
        _check_url(url, next_url, policy)
        resolver.url = next_url
        return {"Accept": "image/*"}

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        return await download(session, url, limits.max_bytes, name=short(url), hop=hop)


def _no_headers(url: str) -> Mapping[str, str]:
    return {}


def _any_body(response: aiohttp.ClientResponse, url: str) -> None:
    return None


async def download(
    session: aiohttp.ClientSession,
    url: str,
    max_bytes: int,
    *,
    name: str,
    source: str = "",
    hop: Callable[[str], Mapping[str, str]] = _no_headers,
    check: Callable[[aiohttp.ClientResponse, str], None] = _any_body,
) -> bytes:
    """The body of `url` (at most `max_bytes`), with redirects followed by hand, or `FetchRefused`
    saying in plain words why not. Every hop's link goes through `hop`, which refuses it (raising
    `FetchRefused`) or returns the headers to send there; the final answer must be a 200 that `check`
    (given it and its link) lets through. Refusals name the file `name`, found at `source` (" from
    Slack"); the session's timeouts apply."""
    try:
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(url, allow_redirects=False, headers=hop(url)) as response:
                if response.status in _REDIRECTS and "Location" in response.headers:
                    url = urljoin(url, response.headers["Location"])
                    continue
                if response.status != 200:
                    raise FetchRefused(f"I couldn't fetch {name}{source}: the server answered {response.status} {response.reason or ''}".rstrip() + ".")
                check(response, url)
                return await read_body(name, response, max_bytes)
        raise FetchRefused(f"I couldn't fetch {name}{source}: it redirects more than {MAX_REDIRECTS} times.")
    except TimeoutError:
        raise FetchRefused(f"I couldn't fetch {name}{source}: it took longer than {session.timeout.total:g} s.") from None
    except aiohttp.ClientError as exc:
        raise FetchRefused(f"I couldn't fetch {name}{source}: {_client_error(exc)}.") from None


def _check_url(original: str, url: str, policy: AddressPolicy) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        where = "it" if url == original else f"it redirects to a {parts.scheme or 'schemeless'} link, which"
        raise FetchRefused(f"I won't fetch {short(original)}: {where} is not an http or https link.")
    if not parts.hostname:
        raise FetchRefused(f"I couldn't fetch {short(original)}: the link has no host.")
    address = _literal_address(parts.hostname)
    if address is not None:
        policy.check(original, parts.hostname, address)


async def read_body(url: str, response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The response body, refused (naming `url`) as soon as it passes `max_bytes`."""
    too_big = FetchRefused(f"I won't fetch {short(url)}: it is larger than the {max_bytes / (1024 * 1024):.1f} MB limit.")
    if response.content_length is not None and response.content_length > max_bytes:
        raise too_big
    body = bytearray()
    async for chunk in response.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise too_big
    return bytes(body)


def _client_error(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.InvalidURL):
        return "the link is not valid"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "the server could not be reached"
    return "the connection failed"
