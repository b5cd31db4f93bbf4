"""Slack's HTTP mode: each request is checked before Bolt sees it.

Bolt answers 500, and logs a traceback, for a body that isn't UTF-8 or isn't a JSON object, and for a
timestamp header that isn't a small number. Here a request whose signature doesn't check out gets 401
and a signed one that is malformed gets 400, in one log line each; only well-formed, signed requests
reach Bolt (which checks the signature again, as it always does).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from aiohttp import web
from aiohttp.typedefs import Middleware

log = logging.getLogger(__name__)

# Slack refuses requests older than this, and so do we: a replayed request is not Slack's.
MAX_AGE_S = 300
_TIMESTAMP_DIGITS = 12  # Unix time in seconds for the next 30,000 years

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def signed_by_slack(raw: bytes, timestamp: str | None, signature: str | None, secret: str, now: float) -> bool:
    """Whether `raw` carries Slack's signature (`v0=` HMAC-SHA256 of "v0:{timestamp}:{body}") made
    within the last five minutes. Any header value, however odd, gives False, never an error."""
    if not timestamp or not signature or len(timestamp) > _TIMESTAMP_DIGITS or not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs(now - int(timestamp)) > MAX_AGE_S:
        return False
    expected = "v0=" + hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace"))


def malformed(raw: bytes, content_type: str) -> str | None:
    """Why a signed body is not something Slack sends (a JSON object, or a form whose `payload`, if
    any, is one), or None if it is well formed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    try:
        if content_type == "application/json":
            return None if isinstance(json.loads(text), dict) else "not a JSON object"
        if content_type == "application/x-www-form-urlencoded":
            payload = parse_qs(text).get("payload")
            return None if payload is None or isinstance(json.loads(payload[-1]), dict) else "a payload that is not a JSON object"
    except (ValueError, RecursionError):
        return "malformed JSON"
    return f"an unexpected content type ({content_type[:60]})"


def request_check(signing_secret: str, clock: Callable[[], float] = time.time) -> Middleware:
    """An aiohttp middleware for the events endpoint: 401 for a bad signature, 400 for a signed but
    malformed body, and the request passed on otherwise."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST":
            return await handler(request)
        raw = await request.read()  # aiohttp keeps it: Bolt reads the same bytes
        headers = request.headers
        if not signed_by_slack(raw, headers.get("X-Slack-Request-Timestamp"), headers.get("X-Slack-Signature"), signing_secret, clock()):
            log.warning("slack.request_refused", extra={"reason": "bad signature", "bytes": len(raw)})
            return web.Response(status=401, text="invalid signature")
        problem = malformed(raw, request.content_type)
        if problem is not None:
            log.warning("slack.request_refused", extra={"reason": problem, "bytes": len(raw)})
            return web.Response(status=400, text=f"malformed request: {problem}")
        return await handler(request)

    return check
