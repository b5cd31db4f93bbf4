"""The web chat's HTTP side, spoken to directly (aiohttp's client): what a hostile page or client
meets, the limits, and when `idefics-bot run` starts the web chat. The page itself is tested in a real
browser in tests/test_web_browser.py."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from adapters.web.form import FormRefused, UploadBudget
from adapters.web.guard import COOKIE, SECURITY_HEADERS, LoginThrottle, Sessions
from bot.runtime.app import enabled_adapters
from bot.runtime.config import load_config
from bot.settings import ConfigError
from tests.conftest import BOTH_FAMILIES, image_bytes, write_config
from tests.loopback import LoopbackServer
from tests.model_tap import ModelTap
from tests.test_cli import web_chat_process
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


# -- under attack: what a hostile client sends over raw HTTP ----------------------------------


def no_server_errors(caplog) -> None:
    """Nothing the server logged at ERROR (aiohttp logs a handler's exception with its traceback)."""
    errors = [f"{record.name}: {record.getMessage()}" for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors


async def raw_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = urlsplit(url)
    return await asyncio.open_connection(address.hostname, address.port)


MALFORMED = {
    "no boundary": ("multipart/form-data", b"x"),
    "garbage after the boundary": ("multipart/form-data; boundary=abc", b"x" * 100),
    "a part cut before its end": ("multipart/form-data; boundary=abc", b'--abc\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nhello'),
    "a bad part header": ("multipart/form-data; boundary=abc", b"--abc\r\ngarbage\r\n\r\n--abc--\r\n"),
    "an empty body": ("multipart/form-data; boundary=abc", b""),
}


async def test_malformed_forms_are_refused_with_a_message_not_a_server_error(tmp_path, tiny_checkpoint, tap: ModelTap, caplog):
    caplog.set_level(logging.INFO)
    async with web_bot(web_config(tmp_path, tiny_checkpoint)) as bot, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        await session_cookie(client, bot.url)
        for shape, (content_type, body) in MALFORMED.items():
            async with client.post(f"{bot.url}api/conversations/new/messages", data=body, headers={"Content-Type": content_type}) as refused:
                assert refused.status == 400, shape
                assert "malformed" in (await refused.json())["error"] or "cut off" in (await refused.json())["error"], shape
    async with web_bot(web_config(tmp_path, tiny_checkpoint, web={"host": "0.0.0.0", "token": TOKEN})) as bot, aiohttp.ClientSession() as client:
        for content_type in ("multipart/form-data", "multipart/form-data; boundary=nothere"):
            async with client.post(f"{bot.url}login", data=b"token=x", headers={"Content-Type": content_type}, allow_redirects=False) as refused:
                assert refused.status == 400 and "couldn't be read" in await refused.text()
    assert not tap.prompts
    no_server_errors(caplog)


async def test_an_endless_form_is_refused_within_a_bound_while_other_people_are_served(tmp_path, tiny_checkpoint, tap: ModelTap, caplog):
    """A chunked body of empty image parts that never ends, 200,000 empty parts with a length, and a
    chunked preamble of short lines that never ends: each refused early, and another person's page
    loads within a second meanwhile."""
    async with web_bot(web_config(tmp_path, tiny_checkpoint)) as bot, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        cookie = await session_cookie(client, bot.url)
        empty_part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="e.png"\r\n\r\n\r\n'
        loop = asyncio.get_running_loop()

        async def attack(chunked: bool, repeated: bytes) -> tuple[bytes, float]:
            reader, writer = await raw_connection(bot.url)
            head = f"POST /api/conversations/new/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {COOKIE}={cookie}\r\n"
            head += "Content-Type: multipart/form-data; boundary=b\r\n"
            parts = repeated * 1000
            head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(empty_part) * 200_000}\r\n\r\n"
            started = loop.time()
            writer.write(head.encode())

            async def send_forever() -> None:
                for _ in range(200):  # 200,000 parts, or until the server stops reading
                    writer.write(b"%x\r\n%s\r\n" % (len(parts), parts) if chunked else parts)
                    await writer.drain()

            sending = asyncio.create_task(send_forever())
            try:
                status = await asyncio.wait_for(reader.readline(), 30)
                return status, loop.time() - started
            finally:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
                writer.close()

        for chunked, repeated in ((True, empty_part), (False, empty_part), (True, b"x\r\n" * 20)):
            attacking = asyncio.create_task(attack(chunked, repeated))
            started = loop.time()
            async with aiohttp.ClientSession() as other, other.get(bot.url) as page:
                assert page.status == 200
                assert loop.time() - started < 1.0
            status, took = await attacking
            assert status.startswith(b"HTTP/1.1 413"), status
            assert took < 5.0, took
    assert not tap.prompts
    no_server_errors(caplog)


async def test_slow_headers_and_slow_bodies_are_cut_off(tmp_path, tiny_checkpoint, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint, web={"header_timeout_s": 1.0, "body_timeout_s": 1.0})
    async with web_bot(config) as bot, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        cookie = await session_cookie(client, bot.url)
        loop = asyncio.get_running_loop()
        # Headers a byte at a time, never finished: the server hangs up once the timeout has passed.
        reader, writer = await raw_connection(bot.url)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")

        async def trickle() -> None:
            while True:
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.2)  # the attack's pace, not a wait for the server

        trickling = asyncio.create_task(trickle())
        started = loop.time()
        try:
            assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing answered
            assert 0.9 < loop.time() - started < 5.0
        finally:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
            writer.close()
        # A body that doesn't come: 408 once its time is up.
        reader, writer = await raw_connection(bot.url)
        writer.write(
            f"POST /api/conversations/new/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {COOKIE}={cookie}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n--b\r\n".encode()
        )
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 408")
        writer.close()
    assert not tap.prompts


async def test_connections_are_bounded(tmp_path, tiny_checkpoint, tap: ModelTap):
    async with web_bot(web_config(tmp_path, tiny_checkpoint, web={"max_connections": 3})) as bot:
        # Three idle keep-alive connections (each has made a request, so the server holds it): a fourth is turned away.
        held = []
        for _ in range(3):
            reader, writer = await raw_connection(bot.url)
            writer.write(b"GET /static/icon.svg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            held.append(writer)
        reader, fourth = await raw_connection(bot.url)
        fourth.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 503") and b"Too many connections" in answer
        for writer in (*held, fourth):
            writer.close()
    assert not tap.prompts


async def test_wrong_tokens_are_throttled_without_locking_the_owner_out(tmp_path, tiny_checkpoint, tap: ModelTap):
    config = web_config(tmp_path, tiny_checkpoint, web={"host": "0.0.0.0", "token": TOKEN})
    async with web_bot(config) as bot:
        async with aiohttp.ClientSession() as attacker:
            for _ in range(5):
                async with attacker.post(f"{bot.url}login", data={"token": "a-wrong-guess-0123456789"}, allow_redirects=False) as wrong:
                    assert wrong.status == 401
            async with attacker.post(f"{bot.url}login", data={"token": TOKEN}, allow_redirects=False) as throttled:
                assert throttled.status == 429 and "Too many wrong tokens" in await throttled.text()
                assert int(throttled.headers["Retry-After"]) >= 1
        # The owner, from an address of their own (127.0.0.2 is loopback too), gets in at once.
        owner = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
        async with owner, owner.post(f"{bot.url}login", data={"token": TOKEN}, allow_redirects=False) as signed_in:
            assert signed_in.status == 303


def test_the_sign_in_throttle_delays_grow_and_a_flood_of_addresses_leaves_the_owner_a_way_in():
    now = [1000.0]
    throttle = LoginThrottle(free=3, per_minute=10, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.admit("mallory") == 0
        throttle.wrong("mallory")
    delays = []
    for _ in range(4):
        delays.append(throttle.admit("mallory"))
        now[0] += delays[-1]
        assert throttle.admit("mallory") == 0
        throttle.wrong("mallory")
    assert delays == [1.0, 2.0, 4.0, 8.0]
    # A flood from many addresses: beyond 10 wrong guesses a minute, those who guessed wrong wait...
    for number in range(10):
        throttle.wrong(f"bot-{number}")
    assert throttle.admit("bot-1") > 0
    # ...and those who didn't (the owner) share one check a second.
    assert throttle.admit("owner") == 0
    assert throttle.admit("someone-else") > 0
    now[0] += 1.0
    assert throttle.admit("someone-else") == 0
    throttle.right("mallory")
    now[0] += 60
    assert throttle.admit("mallory") == 0


async def test_behind_a_trusted_proxy_the_cookie_is_secure_over_https_and_the_client_is_the_forwarded_one(tmp_path, tiny_checkpoint, tap: ModelTap):
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.7"}
    async with web_bot(web_config(tmp_path, tiny_checkpoint)) as bot, aiohttp.ClientSession() as client, client.get(bot.url, headers=https) as page:
        assert "Secure" not in page.headers["Set-Cookie"]  # nobody said to believe those headers
    config = web_config(tmp_path, tiny_checkpoint, web={"trust_proxy": True, "host": "0.0.0.0", "token": TOKEN})
    async with web_bot(config) as bot, aiohttp.ClientSession() as client:
        async with client.post(f"{bot.url}login", data={"token": TOKEN}, headers=https, allow_redirects=False) as signed_in:
            assert signed_in.status == 303 and "; Secure" in signed_in.headers["Set-Cookie"]
        async with client.post(f"{bot.url}login", data={"token": TOKEN}, headers={**https, "X-Forwarded-Proto": "http"}, allow_redirects=False) as plain:
            assert plain.status == 303 and "Secure" not in plain.headers["Set-Cookie"]
        for _ in range(5):  # wrong guesses from one address behind the proxy...
            async with client.post(f"{bot.url}login", data={"token": "a-wrong-guess-0123456789"}, headers=https, allow_redirects=False) as wrong:
                assert wrong.status == 401
        async with client.post(f"{bot.url}login", data={"token": TOKEN}, headers=https, allow_redirects=False) as throttled:
            assert throttled.status == 429
        elsewhere = {**https, "X-Forwarded-For": "198.51.100.7, 203.0.113.9"}  # ...throttle that address, not the proxy's
        async with client.post(f"{bot.url}login", data={"token": TOKEN}, headers=elsewhere, allow_redirects=False) as other:
            assert other.status == 303


def test_a_short_token_from_the_environment_is_named_by_its_variable(tmp_path):
    (tmp_path / "config.toml").write_text('[web]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="IDEFICS_WEB_TOKEN \\(in the environment\\) must be at least 16 characters"):
        load_config(tmp_path / "config.toml", environ={"IDEFICS_WEB_TOKEN": "short"})


async def test_the_upload_budget_is_shared_in_order_and_says_busy_when_it_stays_full():
    budget = UploadBudget(100, wait_s=0.2)
    first = await budget.reserve(60)
    second = asyncio.create_task(budget.reserve(60))
    third = asyncio.create_task(budget.reserve(30))  # would fit, but waits its turn behind the second
    await asyncio.sleep(0)
    assert not second.done() and not third.done() and budget.free == 40
    first.release()
    first.release()  # once only
    held = [await second, await third]
    assert budget.free == 10
    with pytest.raises(FormRefused) as busy:
        await budget.reserve(20)
    assert busy.value.status == 503 and "busy" in str(busy.value)
    for reservation in held:
        reservation.release()
    assert budget.free == 100


def reset_peak(pid: int) -> None:
    """Start a process's VmHWM again from its present resident memory."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory_kb(pid: int) -> dict[str, int]:
    """A process's resident memory now (VmRSS) and at its peak (VmHWM), in kB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


async def test_eight_concurrent_maximal_uploads_stay_within_the_upload_memory(tmp_path, tiny_checkpoint):
    """The bot's peak memory while 8 people each send 4 images at the size limit (20 MB) at once. The
    bot runs as a process of its own, so that nothing else in the test run moves its memory. Without
    a shared budget the uploads alone would hold 8 x 80 MB (and copies: +735 MB measured before the
    budget); with it, the peak stays within [web] upload_memory_mb and a margin, and the memory is
    given back afterwards."""
    budget_mb, margin_mb = 256, 96
    (tmp_path / "config.toml").write_text(
        f"""
[generation]
max_new_tokens = 2
[limits]
per_user_per_minute = 0
[state]
path = "{tmp_path / 'state' / 'bot.sqlite3'}"
[web]
port = 0
upload_memory_mb = {budget_mb}
"""
    )
    async with web_chat_process(tmp_path, tiny_checkpoint) as (bot, url, _):
        picture = image_bytes()
        maximal = picture + b"\0" * (20 * 2**20 - len(picture))  # a valid PNG, padded to exactly the limit
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), timeout=aiohttp.ClientTimeout(total=240)) as client:
            await session_cookie(client, url)

            async def send() -> tuple[int, dict]:
                message = form("What are these?", *[(f"{n}.png", maximal) for n in range(4)])
                async with client.post(f"{url}api/conversations/new/messages", data=message) as answer:
                    return answer.status, (await lines(answer))[-1] if answer.status == 200 else await answer.json()

            assert (await send())[0] == 200  # warmed up: the model has answered once, with images
            before = memory_kb(bot.pid)["VmRSS"]
            reset_peak(bot.pid)  # the peak starts from here
            answers = await asyncio.gather(*(send() for _ in range(8)))
            async with client.post(f"{url}api/conversations/new/messages", data=form("And now?")) as after:
                assert (await lines(after))[-1]["type"] == "final"  # by now, the 8 replies are done with
            used = memory_kb(bot.pid)
        peak_mb, kept_mb = (used["VmHWM"] - before) / 1024, (used["VmRSS"] - before) / 1024
        print(f"8 concurrent uploads of 4 x 20 MB: peak +{peak_mb:.0f} MB, afterwards +{kept_mb:.0f} MB (upload memory {budget_mb} MB)")
        statuses = [status for status, _ in answers]
        assert all(status == 200 or (status == 503 and "busy" in body["error"]) for status, body in answers), answers
        assert statuses.count(200) >= 4, statuses  # the others waited their turn, at most briefly
        assert all(body["type"] == "final" and not body["notes"] for status, body in answers if status == 200), answers
        assert peak_mb < budget_mb + margin_mb
        assert kept_mb < margin_mb


async def test_a_message_waiting_for_the_model_holds_no_upload_memory_it_does_not_need(tmp_path, tiny_checkpoint, tap: ModelTap):
    """A chunked body has no length to reserve by, so it reserves the largest message's room (here,
    all of the upload memory) while it is read; once read, it keeps only its images' bytes."""
    config = web_config(tmp_path, tiny_checkpoint, web={"upload_memory_mb": 1})
    async with web_bot(config) as bot, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        await session_cookie(client, bot.url)
        endpoint = f"{bot.url}api/conversations/new/messages"

        async def chunked():
            yield b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nTell me a story.\r\n--b--\r\n'

        tap.gate.clear()
        async with client.post(endpoint, data=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"}) as first:
            assert first.status == 200
            await tap.wait_held()  # its reply is being written, and held there
            async with client.post(endpoint, data=form("And this?", ("red.png", image_bytes()))) as second:
                assert second.status == 200  # not "busy": the first holds no upload memory now
                tap.gate.set()
                assert (await lines(second))[-1]["type"] == "final"
            assert (await lines(first))[-1]["type"] == "final"
