"""The web chat's HTTP side, spoken to directly (aiohttp's client): what a hostile page or client
meets, the limits, and when `idefics-bot run` starts the web chat. The page itself is tested in a real
browser in tests/test_web_browser.py."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from adapters.web_guard import COOKIE, SECURITY_HEADERS, Sessions
from bot.runtime.app import enabled_adapters
from bot.runtime.config import ConfigError
from tests.conftest import BOTH_FAMILIES, image_bytes, write_config
from tests.loopback import LoopbackServer
from tests.model_tap import ModelTap, tap  # noqa: F401 (a fixture)
from tests.web_chat import TOKEN, web_bot, web_config


async def session_cookie(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url) as page:
        assert page.status == 200
        return page.cookies[COOKIE].value


def form(text: str, *images: tuple[str, bytes]) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("text", text)
    for name, content in images:
        data.add_field("image", content, filename=name, content_type="image/png")
    return data


async def lines(response: aiohttp.ClientResponse) -> list[dict]:
    return [json.loads(line) for line in (await response.text()).splitlines()]


async def test_requests_from_other_sites_and_other_host_names_are_refused(tmp_path, tiny_checkpoint, tap: ModelTap):
    async with web_bot(web_config(tmp_path, tiny_checkpoint)) as bot, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        await session_cookie(client, bot.url)
        origin = bot.url.rstrip("/")
        endpoint = f"{bot.url}api/conversations/new/messages"
        # A page on another site posting with the visitor's cookie (a cross-site form, or fetch).
        async with client.post(endpoint, data=form("hi"), headers={"Origin": "http://evil.example"}) as refused:
            assert refused.status == 403 and "must come from the chat page itself" in (await refused.json())["error"]
        async with client.post(endpoint, data=form("hi"), headers={"Sec-Fetch-Site": "cross-site"}) as refused:
            assert refused.status == 403
        # DNS rebinding: another site's name pointed at 127.0.0.1.
        async with client.get(f"{bot.url}api/conversations", headers={"Host": "evil.example"}) as rebound:
            assert rebound.status == 421
        async with client.post(endpoint, data=form("hi"), headers={"Origin": origin}) as accepted:
            assert accepted.status == 200
            events = await lines(accepted)
        assert events[0]["type"] == "conversation" and events[-1]["type"] == "final" and events[-1]["text"]
        assert not tap.prompts[0].count("evil")
        for headers in (accepted.headers, rebound.headers, refused.headers):
            for name, value in SECURITY_HEADERS.items():
                assert headers[name] == value
        assert "script-src 'self'" in SECURITY_HEADERS["Content-Security-Policy"] and "unsafe-inline" not in SECURITY_HEADERS["Content-Security-Policy"]


async def test_requests_without_a_session_or_with_a_forged_one_are_refused(tmp_path, tiny_checkpoint, tap: ModelTap):
    async with web_bot(web_config(tmp_path, tiny_checkpoint)) as bot, aiohttp.ClientSession() as client:
        for cookie in (None, "made-up", "abc.0123"):
            headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
            async with client.get(f"{bot.url}api/conversations", headers=headers) as response:
                assert response.status == 401 and "Reload the page" in (await response.json())["error"]
    assert not tap.prompts


async def test_an_exposed_chat_refuses_everything_but_its_sign_in_without_the_token(tmp_path, tiny_checkpoint, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint, web={"host": "0.0.0.0", "token": TOKEN})
    async with web_bot(config) as bot, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        async with client.get(bot.url) as page:
            assert page.status == 401 and 'name="token"' in await page.text() and COOKIE not in page.cookies
        for method, path in (("GET", "api/conversations"), ("POST", "api/conversations/new/messages"), ("POST", "api/conversations/0123456789abcdef/reset")):
            async with client.request(method, bot.url + path) as refused:
                assert refused.status == 401, path
        # A session cookie of an instance without a token (or before the token changed) is no good here.
        open_cookie = Sessions(None).new_cookie()
        async with client.get(f"{bot.url}api/conversations", headers={"Cookie": f"{COOKIE}={open_cookie}"}) as refused:
            assert refused.status == 401
        async with client.post(f"{bot.url}login", data={"token": TOKEN[:-1] + "x"}, allow_redirects=False) as wrong:
            assert wrong.status == 401 and "isn't the one in [web] token" in await wrong.text()
        async with client.post(f"{bot.url}login", data={"token": TOKEN}, allow_redirects=False) as signed_in:
            assert signed_in.status == 303
        async with client.get(f"{bot.url}api/conversations") as listed:
            assert listed.status == 200 and await listed.json() == {"conversations": []}
    assert not tap.prompts


async def test_uploads_are_bounded_before_they_cost_anything(tmp_path, tiny_checkpoint, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint)
    config = config.model_copy(update={"images": config.images.model_copy(update={"max_bytes": 100_000, "max_per_turn": 2})})
    async with web_bot(config) as bot, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        await session_cookie(client, bot.url)
        endpoint = f"{bot.url}api/conversations/new/messages"
        big = image_bytes(size=(64, 48)) + b"\0" * 250_000
        async with client.post(endpoint, data=form("what?", ("big.png", big))) as answered:
            final = (await lines(answered))[-1]
        assert final["notes"] == ["big.png is 0.2 MB; the limit is 0.1 MB per image."]
        async with client.post(endpoint, data=form("what?", *[(f"{n}.png", b"\0" * 90_000) for n in range(5)])) as too_much:
            assert too_much.status == 413 and "at most 2 images" in (await too_much.json())["error"]
        async with client.post(endpoint, data=form("x" * 70_000)) as too_long:
            assert too_long.status == 413 and "too long" in (await too_long.json())["error"]
        async with client.post(endpoint, json={"text": "hi"}) as wrong_kind:
            assert wrong_kind.status == 415
        async with client.get(f"{bot.url}api/conversations/..%2F..%2Fetc") as odd:
            assert odd.status == 404
        async with client.get(f"{bot.url}static/..%2Fweb.py") as escaped:
            assert escaped.status == 404
    assert not tap.prompts


def test_the_web_chat_runs_when_nothing_else_is_configured_or_when_enabled(tmp_path):
    assert enabled_adapters(write_config(tmp_path / "a.toml", "")) == ["web"]
    assert enabled_adapters(write_config(tmp_path / "b.toml", '[discord]\ntoken = "t"\n')) == ["discord"]
    assert enabled_adapters(write_config(tmp_path / "c.toml", '[discord]\ntoken = "t"\n[web]\nenabled = true\n')) == ["discord", "web"]
    assert enabled_adapters(write_config(tmp_path / "d.toml", "[web]\nenabled = false\n")) == []


@pytest.mark.parametrize(
    "section, problem",
    [
        ('host = "0.0.0.0"', "host '0.0.0.0' exposes the web chat beyond this machine, so it needs an access token: set [web] token"),
        ('host = "192.168.1.20"', "needs an access token"),
        ('host = "0.0.0.0"\ntoken = "short"', "token must be at least 16 characters"),
    ],
)
def test_exposing_the_web_chat_needs_a_token(tmp_path, section, problem):
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        write_config(tmp_path / "config.toml", f"[web]\n{section}\n")
    allowed = write_config(tmp_path / "ok.toml", f'[web]\nhost = "0.0.0.0"\ntoken = "{TOKEN}"\n')
    assert allowed.section("web").token.get_secret_value() == TOKEN and TOKEN not in repr(allowed)


@BOTH_FAMILIES
async def test_each_browser_session_has_its_own_rate_limit_and_image_links_are_fetched(tmp_path, tiny_checkpoint, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint)
    config = config.model_copy(
        update={
            "limits": config.limits.model_copy(update={"per_user_per_minute": 1, "per_user_burst": 1}),
            "images": config.images.model_copy(update={"allowed_hosts": ["127.0.0.1"]}),
        }
    )

    async def picture(request: web.Request) -> web.Response:
        return web.Response(body=image_bytes(), content_type="image/png")

    async with LoopbackServer({"/cat.png": picture}) as images, web_bot(config) as bot:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as ann, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as bob:
            for client in (ann, bob):
                await session_cookie(client, bot.url)
            endpoint = f"{bot.url}api/conversations/new/messages"
            async with ann.post(endpoint, data=form(f"What is this? {images.url('/cat.png')}")) as first:
                assert (await lines(first))[-1]["text"]
            assert images.requests == ["/cat.png"] and "<image>" in tap.prompt()
            async with ann.post(endpoint, data=form("And again?")) as second:
                assert (await lines(second))[-1]["notes"][0].startswith("You're sending requests faster than I can answer.")
            async with bob.post(endpoint, data=form("Hello?")) as other:
                assert (await lines(other))[-1]["text"]  # Bob's own allowance
