"""What stands between the web chat and the network: browser sessions, the access token, same-origin
checks and the security headers of every response.

- Every browser gets a session cookie holding a random secret; its user id (the conversations' channel
  and the rate limiter's key) is a hash of that secret, so nothing stored can be turned back into a
  cookie. With an access token configured, the cookie also carries an HMAC keyed by the token: only
  someone who typed the token gets a valid one, and changing the token signs everybody out.
- Requests that change state must come from the page itself (Origin, or Sec-Fetch-Site, matches),
  so another site can't post in somebody's name. On loopback without a token, the Host must be a
  loopback name too, so a page on another site can't reach the chat through DNS rebinding.
- Every response carries a content security policy that only lets the page run its own scripts and
  styles and talk to its own origin.
- Wrong tokens are throttled per client address and in total (`LoginThrottle`), connections are
  bounded (`ConnectionLimit`), and behind a TLS-terminating proxy (`[web] trust_proxy`) the proxy's
  X-Forwarded-Proto and X-Forwarded-For say the scheme (a Secure cookie over https) and the client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

COOKIE = "idefics_session"
USER = web.RequestKey("user", str)  # the session's user id, set for every request past the guard
_COOKIE_MAX_AGE_S = 365 * 24 * 3600
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make form posts say Origin: null
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class Sessions:
    """Issues and checks session cookies; `token` is the access token, or None when none is needed."""

    def __init__(self, token: str | None):
        self.token_required = token is not None
        self._token_digest = _digest(token or "")
        self._key = hashlib.sha256(b"idefics-web-session\0" + self._token_digest).digest()

    def token_matches(self, given: str) -> bool:
        """Constant time whatever the lengths: both sides are hashed first."""
        return self.token_required and hmac.compare_digest(_digest(given), self._token_digest)

    def new_cookie(self) -> str:
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._sign(nonce)}"

    def user_of(self, cookie: str | None) -> str | None:
        """The user id a cookie stands for, or None if it isn't one of ours (or the token changed)."""
        if not cookie or len(cookie) > 128:
            return None
        nonce, _, mac = cookie.partition(".")
        if not nonce or not hmac.compare_digest(mac.encode(), self._sign(nonce).encode()):
            return None
        return hashlib.sha256(nonce.encode()).hexdigest()[:32]

    def _sign(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), hashlib.sha256).hexdigest()

    def set_cookie(self, response: web.StreamResponse, request: web.Request) -> str:
        """Give the browser a new session; returns its user id."""
        cookie = self.new_cookie()
        response.set_cookie(COOKIE, cookie, max_age=_COOKIE_MAX_AGE_S, path="/", httponly=True, samesite="Strict", secure=request.secure)
        return self.user_of(cookie) or ""


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """For `on_response_prepare`: every response, streamed ones and errors included."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def json_error(status: int, message: str) -> web.Response:
    """An error the page shows as it is: `message` says what happened and what to do."""
    return web.json_response({"error": message}, status=status, headers={"Cache-Control": "no-store"})


def same_origin(request: web.Request) -> bool:
    """Whether a request comes from a page of this origin (or from no browser page at all: a tool such
    as curl sends neither header, and has no browser's cookies to misuse)."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin != "null" and urlsplit(origin).netloc.lower() == request.host.lower()
    site = request.headers.get("Sec-Fetch-Site")
    return site is None or site in ("same-origin", "none")


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to listen on) is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def loopback_host(request: web.Request) -> bool:
    host = request.host.lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in _LOOPBACK_NAMES


def behind_proxy(request: web.Request) -> web.Request:
    """The request as the client sent it to the proxy: its scheme (X-Forwarded-Proto) and address (the
    last X-Forwarded-For entry, the one the proxy itself added). Only for a trusted proxy."""
    changes: dict = {}
    scheme = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    if scheme in ("http", "https"):
        changes["scheme"] = scheme
    client = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
    with contextlib.suppress(ValueError):  # not an address: keep the proxy's own
        changes["remote"] = str(ipaddress.ip_address(client))
    return request.clone(**changes) if changes else request


def guard(sessions: Sessions, loopback_only: bool, public: frozenset[str], trust_proxy: bool = False) -> Callable:
    """The middleware: host, origin and session checks before handlers. Paths in `public` (the
    page's own files, the login form) need no session; the others get the session's user id as
    `request[USER]`. With `trust_proxy`, handlers see the request as the proxy says it came."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if trust_proxy:
            request = behind_proxy(request)
        if loopback_only and not loopback_host(request):
            return json_error(421, "This web chat answers only at localhost or 127.0.0.1.")
        if request.method not in _SAFE_METHODS and not same_origin(request):
            return json_error(403, "Requests that change something must come from the chat page itself.")
        if request.path not in public and not request.path.startswith("/static/"):
            user = sessions.user_of(request.cookies.get(COOKIE))
            if user is None:
                return json_error(401, "Your session has ended (or the access token changed). Reload the page to sign in.")
            request[USER] = user
        return await handler(request)

    return middleware


@dataclass
class _Guesses:
    wrong: int = 0
    until: float = 0.0  # no check before this (monotonic time)


class LoginThrottle:
    """Bounds wrong token guesses. A client address gets `free` wrong guesses, then must wait before
    each next one, twice as long each time (1 s, 2 s, ... up to `max_delay_s`); a right token clears
    its record. In total, at most `per_minute` wrong guesses a minute are checked: beyond that, clients
    that guessed wrong before wait, and the others (the owner, say, from an address of their own)
    share one check a second, so an attacker can't lock the owner out."""

    def __init__(self, free: int = 5, per_minute: int = 30, max_delay_s: float = 900.0, clients: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.free = free
        self.per_minute = per_minute
        self.max_delay_s = max_delay_s
        self.clock = clock
        self._clients: collections.OrderedDict[str, _Guesses] = collections.OrderedDict()
        self._most_clients = clients
        self._recent: collections.deque[float] = collections.deque()  # times of wrong guesses in the last minute
        self._newcomers_next = 0.0

    def admit(self, client: str) -> float:
        """0 if `client` may have its guess checked now, else the seconds it must wait."""
        now = self.clock()
        guesses = self._clients.get(client)
        if guesses is not None and guesses.until > now:
            return guesses.until - now
        while self._recent and self._recent[0] <= now - 60:
            self._recent.popleft()
        if len(self._recent) < self.per_minute:
            return 0.0
        if guesses is not None:
            return self._recent[0] + 60 - now
        if now < self._newcomers_next:
            return self._newcomers_next - now
        self._newcomers_next = now + 1.0
        return 0.0

    def wrong(self, client: str) -> None:
        now = self.clock()
        guesses = self._clients.pop(client, None) or _Guesses()
        guesses.wrong += 1
        if guesses.wrong >= self.free:
            guesses.until = now + min(2.0 ** (guesses.wrong - self.free), self.max_delay_s)
        self._clients[client] = guesses  # the most recent last: the oldest record goes first
        if len(self._clients) > self._most_clients:
            self._clients.popitem(last=False)
        self._recent.append(now)

    def right(self, client: str) -> None:
        self._clients.pop(client, None)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class _Refused(asyncio.Protocol):
    """A connection beyond the bound: told so, and closed."""

    _ANSWER = b"Too many connections to the web chat right now; please try again in a moment.\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(self._ANSWER)}\r\nConnection: close\r\nRetry-After: 5\r\n\r\n"
        )
        transport.write(head.encode() + self._ANSWER)
        transport.close()


class ConnectionLimit:
    """The listening socket's protocol factory: aiohttp's `server` while it has fewer than `limit`
    open connections, a 503 and a close beyond (give or take the connections accepted at once)."""

    def __init__(self, server: web.Server, limit: int):
        self.server = server
        self.limit = limit

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            return _Refused()
        return self.server()
