"""Fetching image links: only public addresses, checked at every hop, within size and time limits.

Servers run on 127.0.0.x; private and link-local targets elsewhere are checked at the decision layer
with name resolution stubbed and connecting made impossible, so no packet leaves loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress

import aiohttp.connector
import pytest
from aiohttp import web

from bot.images.fetch import AddressPolicy, FetchLimits, FetchRefused, fetch, is_public
from tests.conftest import image_bytes
from tests.loopback import LoopbackServer

PNG = image_bytes()
LOOPBACK_ONLY = FetchLimits(allowed_hosts=frozenset({"127.0.0.1"}), total_timeout=5)


async def serve_png(request):
    return web.Response(body=PNG, content_type="text/plain")  # a lying Content-Type changes nothing


async def test_loopback_is_refused_by_default_and_never_contacted():
    async with LoopbackServer({"/cat.png": serve_png}) as server:
        for url in (server.url("/cat.png"), f"http://localhost:{server.port}/cat.png", f"http://[::ffff:127.0.0.1]:{server.port}/cat.png"):
            with pytest.raises(FetchRefused, match=r"private or local network address"):
                await fetch(url, FetchLimits())
        assert server.requests == []


async def test_allowed_host_is_fetched():
    async with LoopbackServer({"/cat.png": serve_png}) as server:
        assert await fetch(server.url("/cat.png"), LOOPBACK_ONLY) == PNG


async def test_redirect_to_a_forbidden_address_is_refused_at_that_hop():
    async with LoopbackServer({"/secret": serve_png}, host="127.0.0.1") as inside:

        async def bounce(request):
            raise web.HTTPFound(inside.url("/secret"))

        async with LoopbackServer({"/go": bounce}, host="127.0.0.2") as outside:
            with pytest.raises(FetchRefused, match=r"127.0.0.1"):
                await fetch(outside.url("/go"), FetchLimits(allowed_hosts=frozenset({"127.0.0.2"})))
            assert outside.requests == ["/go"]
        assert inside.requests == []


async def test_too_many_redirects():
    async def loop(request):
        raise web.HTTPFound("/loop")

    async with LoopbackServer({"/loop": loop}) as server:
        with pytest.raises(FetchRefused, match="redirects more than 5 times"):
            await fetch(server.url("/loop"), LOOPBACK_ONLY)
        assert len(server.requests) == 6


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://example.com/x.png", "javascript:alert(1)"])
async def test_only_http_and_https(url):
    with pytest.raises(FetchRefused, match="not an http or https link"):
        await fetch(url, FetchLimits())


async def test_bodies_are_cut_at_the_byte_limit():
    async def declared(request):
        return web.Response(body=b"x" * 5000)

    async def chunked(request):
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"y" * 1000)
        return response

    async with LoopbackServer({"/declared": declared, "/chunked": chunked}) as server:
        small = FetchLimits(max_bytes=2048, allowed_hosts=frozenset({"127.0.0.1"}))
        for path in ("/declared", "/chunked"):
            with pytest.raises(FetchRefused, match=r"larger than the 0.0 MB limit"):
                await fetch(server.url(path), small)


async def test_a_slow_drip_hits_the_total_timeout():
    async def drip(request):
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"z")
            await asyncio.sleep(0.05)
        return response

    async with LoopbackServer({"/drip": drip}) as server:
        with pytest.raises(FetchRefused, match=r"took longer than 0.5 s"):
            await fetch(server.url("/drip"), FetchLimits(total_timeout=0.5, allowed_hosts=frozenset({"127.0.0.1"})))


async def test_http_errors_are_named():
    async with LoopbackServer({}) as server:
        with pytest.raises(FetchRefused, match="the server answered 404 Not Found"):
            await fetch(server.url("/missing.png"), LOOPBACK_ONLY)


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "127.0.0.1", "0.0.0.0", "100.64.0.1",
        "224.0.0.1", "255.255.255.255", "240.0.0.1", "::1", "fe80::1", "fc00::1", "ff02::1", "::",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::", "2002:a00:1::",
        "64:ff9b::a00:1", "::7f00:1", "2001:0:4136:e378:8000:63bf:f5ff:fffe",
    ],
)
def test_private_and_special_addresses_are_not_public(address):
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(FetchRefused):
        AddressPolicy().check("http://x/", "x", address)


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "2002:5db8:d70e::"])
def test_public_addresses_are_public(address):
    assert is_public(ipaddress.ip_address(address))


async def test_a_name_resolving_to_a_private_address_is_refused_without_connecting(monkeypatch):
    loop = asyncio.get_running_loop()

    async def resolve(host, port, **kwargs):
        return [(2, 1, 6, "", ("10.0.0.1", port)), (2, 1, 6, "", ("93.184.215.14", port))]

    async def no_connecting(*args, **kwargs):
        raise AssertionError("tried to connect")

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    monkeypatch.setattr(aiohttp.connector.aiohappyeyeballs, "start_connection", no_connecting)
    with pytest.raises(FetchRefused, match=r"http://internal.example/cat.png: it leads to a private or local network address \(10.0.0.1\)"):
        await fetch("http://internal.example/cat.png", FetchLimits())
