"""The web chat: the bot in a browser tab, served by the bot itself (aiohttp; the page is plain HTML,
CSS and JavaScript from `adapters/web/page`, no build step, nothing from the internet).

    browser POST /api/conversations/{id}/messages -> WebAdapter._post_message -> IncomingMessage
        -> Platform.reply (in a task of its own) -> one JSON line per event streamed back to the page

- Everything it asks of the core goes through its `Platform` (the SDK).
- A browser session is a user (`adapters.web.guard`): its conversations are
  ConversationKey("web", <session's user id>, <conversation id>), kept in the same store as Discord's
  and Slack's, so they survive a restart; nobody else can list or read them.
- The reply runs in a task of the adapter, not of the request: closing the tab doesn't lose the
  answer, and Stop cancels that task.
- Bound to 127.0.0.1 unless `[web] host` says otherwise, which needs `[web] token`.
- Whatever a client sends is bounded before it costs much: connections, the time to send headers and
  bodies, a message form's size, parts and shape (`adapters.web.form`), the memory all uploads in
  flight hold together, and wrong sign-in tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path, PurePath
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import Field, SecretStr, ValidationInfo, model_validator

from adapters.web.form import Form, FormLimits, FormRefused, UploadBudget, give_memory_back, read_form
from adapters.web.guard import (
    COOKIE,
    USER,
    ConnectionLimit,
    LoginThrottle,
    Sessions,
    add_security_headers,
    guard,
    is_loopback,
    json_error,
    retry_after,
)
from bot.sdk.delivery import WRITING, LiveReply, waiting_text
from bot.sdk.platform import ConfigError, Platform
from bot.sdk.settings import AdapterSettings
from ground.conversation import Author, ConversationKey, Turn, Unanswered
from ground.messages import Final, IncomingMessage, Partial, ReplyEvent, Waiting, Working

log = logging.getLogger("adapters.web")  # the platform's logger (as its Platform.log)

PAGE = Path(__file__).with_name("page")
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
_CONVERSATION_ID = re.compile(r"[0-9a-f]{16}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_TEXT_BYTES = 64 * 1024
_MAX_CONVERSATIONS_LISTED = 100
_TITLE_CHARS = 60
_STOP_GRACE_S = 5.0
_PART_HEADERS_BYTES = 64 * 1024  # what a form's boundaries and part headers may add to its contents
_UPLOAD_WAIT_S = 10.0  # how long a message waits for the upload memory before "busy"
STOPPED = "Stopped. This question and the unfinished answer are not kept in the conversation."
_FAILED = "Something went wrong on my side while answering; please try again."


_MAKE_A_TOKEN = "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"


class WebSettings(AdapterSettings):
    """[web]. Left out of the file, `enabled` means: on exactly when no other chat platform is, so
    that `idefics-bot run` does something out of the box."""

    environment: ClassVar[dict[str, str]] = {"token": "IDEFICS_WEB_TOKEN"}
    runs_alone: ClassVar[bool] = True

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (the address is printed)
    # Required when `host` is not a loopback address: people type it once, then a cookie remembers them.
    token: SecretStr | None = None
    # Behind a TLS-terminating proxy: believe its X-Forwarded-Proto (a Secure cookie over https) and
    # X-Forwarded-For (the client's address, for the sign-in throttle). Only when only the proxy can connect.
    trust_proxy: bool = False
    max_connections: int = Field(256, ge=1)  # open at once; beyond, a 503
    header_timeout_s: float = Field(10.0, gt=0)  # to send a request's headers (and how long an idle connection stays)
    body_timeout_s: float = Field(120.0, gt=0)  # to send a message's whole body
    upload_memory_mb: int = Field(256, ge=1)  # held by all uploads in flight together (at least one largest message)

    @classmethod
    def secrets_needed(cls, section: Mapping[str, Any]) -> list[str]:
        return []  # the token only when exposed, which the check below asks for

    @model_validator(mode="after")
    def _exposed_needs_a_token(self, info: ValidationInfo) -> WebSettings:
        if self.token is not None and len(self.token.get_secret_value()) < 16:
            from_environment = "token" in ((info.context or {}).get("from_environment") or ())
            source = f"{self.environment['token']} (in the environment)" if from_environment else "token"
            raise ValueError(f"{source} must be at least 16 characters; {_MAKE_A_TOKEN}")
        if self.enabled is not False and self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} exposes the web chat beyond this machine, so it needs an access token: set [web] token or "
                f"IDEFICS_WEB_TOKEN ({_MAKE_A_TOKEN})"
            )
        return self


class _Unwatched:
    """The surface of an answer nobody is watching (resumed after a restart): it is stored, and the
    page shows it when its conversation is opened."""

    async def post(self, text: str) -> None:
        return None

    async def edit(self, message: object, text: str) -> None:
        return None


class _Stopped:
    """Queued for the page when its reply task was cancelled by Stop."""


class WebAdapter:
    """The web chat on one host and port."""

    Settings = WebSettings
    delivery_errors = ()  # the page reads the stored conversation again when it loses a reply
    name = "web"

    def __init__(self, platform: Platform, settings: WebSettings):
        self.platform = platform
        self.settings = settings
        self.images = platform.images
        self.sessions = Sessions(settings.token.get_secret_value() if settings.token else None)
        self.logins = LoginThrottle()
        self.files = {path.name: path.read_bytes() for path in PAGE.iterdir() if path.suffix in _STATIC_TYPES}
        self.index = (PAGE / "index.html").read_bytes()
        self.login = (PAGE / "login.html").read_text(encoding="utf-8")
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._watching: asyncio.Task | None = None
        self._replies: dict[ConversationKey, set[asyncio.Task]] = {}
        self._server: asyncio.AbstractServer | None = None
        # A message: every image of a turn at its size limit, and one more (refused with its size), the
        # text, and their part headers; as many parts, and a few more (unknown fields are dropped).
        images = self.images
        self.form_limits = FormLimits(
            max_bytes=(images.max_per_turn + 1) * images.max_bytes + _MAX_TEXT_BYTES + _PART_HEADERS_BYTES,
            max_parts=images.max_per_turn + 4,
            max_text_bytes=_MAX_TEXT_BYTES,
            max_image_bytes=images.max_bytes,
            timeout_s=settings.body_timeout_s,
            what_fits=f"at most {images.max_per_turn} images of {images.max_bytes / 2**20:.0f} MB each fit in one",
        )
        largest = self.form_limits.reservation(self.form_limits.max_bytes)  # what read_form reserves for the largest message
        self.uploads = UploadBudget(max(settings.upload_memory_mb * 2**20, largest), _UPLOAD_WAIT_S)

    # -- lifecycle ---------------------------------------------------------------------------

    def _app(self) -> web.Application:
        loopback_only = is_loopback(self.settings.host) and not self.sessions.token_required
        middleware = guard(self.sessions, loopback_only, frozenset({"/", "/login"}), self.settings.trust_proxy)
        app = web.Application(middlewares=[middleware], client_max_size=_MAX_TEXT_BYTES)
        app.on_response_prepare.append(add_security_headers)
        app.router.add_get("/", self._page)
        app.router.add_post("/login", self._login)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/conversations", self._list)
        app.router.add_get("/api/conversations/{conversation}", self._show)
        app.router.add_get("/api/conversations/{conversation}/images/{digest}", self._image)
        app.router.add_post("/api/conversations/{conversation}/messages", self._post_message)
        app.router.add_post("/api/conversations/{conversation}/stop", self._stop_replies)
        app.router.add_post("/api/conversations/{conversation}/reset", self._reset)
        return app

    async def start(self) -> None:
        """Listen, print the address, and answer what a killed process left unanswered."""
        host, port = self.settings.host, self.settings.port
        # aiohttp closes a connection whose request headers haven't all come within keepalive_timeout of
        # its opening (or of the previous response): a slow-header client can't hold it.
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=_STOP_GRACE_S, keepalive_timeout=self.settings.header_timeout_s)
        await runner.setup()
        assert runner.server is not None
        try:
            self._server = await asyncio.get_running_loop().create_server(
                ConnectionLimit(runner.server, self.settings.max_connections), host or None, port, reuse_address=True
            )
        except OSError as error:
            await runner.cleanup()
            raise ConfigError(f"The web chat can't listen on {host}:{port} ({error.strerror}): free the port or change [web] port.") from None
        self._runner = runner
        bound = self._server.sockets[0].getsockname()[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{bound}/"
        print(f"Web chat: {self.url}" + (" (asks for the [web] token)" if self.sessions.token_required else ""), file=sys.stderr, flush=True)
        # What a stopped process left unanswered is answered (and stored) for when its page opens.
        self._watching = asyncio.create_task(self.platform.watch_unanswered(self._take_over), name="web-unanswered")
        log.info("web.started", extra={"url": self.url, "token_required": self.sessions.token_required})

    @property
    def connected(self) -> bool:
        return self._runner is not None

    async def stop(self) -> None:
        """Stop listening; replies still running get a moment, then are cancelled."""
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await self.platform.drain(_STOP_GRACE_S)
        log.info("web.stopped")

    # -- the page ----------------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        user = self.sessions.user_of(request.cookies.get(COOKIE))
        if user is None and self.sessions.token_required:
            return self._login_page(401)
        response = web.Response(body=self.index, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-store"})
        if user is None:
            self.sessions.set_cookie(response, request)
        return response

    def _login_page(self, status: int, problem: str = "") -> web.Response:
        shown = f'<p class="problem" role="alert">{problem}</p>' if problem else ""  # our own fixed strings only
        return web.Response(status=status, text=self.login.replace("<!--problem-->", shown), content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _login(self, request: web.Request) -> web.Response:
        if not self.sessions.token_required:
            raise web.HTTPSeeOther("/")
        client = request.remote or "unknown"
        wait = self.logins.admit(client)
        if wait:
            log.info("web.login_throttled", extra={"wait_s": round(wait, 1)})
            page = self._login_page(429, f"Too many wrong tokens; try again in {retry_after(wait)} s.")
            page.headers["Retry-After"] = retry_after(wait)
            return page
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                form = await request.post()
        except (ValueError, HttpProcessingError, TimeoutError):
            return self._login_page(400, "That sign-in form couldn't be read. Type the token on this page and try again.")
        token = form.get("token")
        if not isinstance(token, str) or not self.sessions.token_matches(token):
            self.logins.wrong(client)
            log.info("web.login_refused")
            return self._login_page(401, "That token isn't the one in [web] token. Check it and try again.")
        self.logins.right(client)
        signed_in = web.HTTPSeeOther("/")
        self.sessions.set_cookie(signed_in, request)
        log.info("web.login")
        raise signed_in

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = self.files.get(name)
        if body is None:
            return json_error(404, f"No such file: {name}")
        return web.Response(body=body, content_type=_STATIC_TYPES[PurePath(name).suffix], headers={"Cache-Control": "no-cache"})

    # -- conversations -----------------------------------------------------------------------

    def _key(self, request: web.Request) -> ConversationKey:
        conversation = request.match_info["conversation"]
        if not _CONVERSATION_ID.fullmatch(conversation):
            raise web.HTTPNotFound(text=json.dumps({"error": "No such conversation."}), content_type="application/json")
        return ConversationKey(self.name, request[USER], conversation)

    async def _list(self, request: web.Request) -> web.Response:
        keys = await self.platform.conversations(request[USER])
        listed = []
        for key in reversed(keys[-_MAX_CONVERSATIONS_LISTED:]):  # newest first
            listed.append({"id": key.thread, "title": _title(await self.platform.turns(key))})
        return web.json_response({"conversations": listed}, headers={"Cache-Control": "no-store"})

    async def _show(self, request: web.Request) -> web.Response:
        key = self._key(request)
        turns = await self.platform.turns(key)
        if not turns and key not in self._replies:
            return json_error(404, "No such conversation: it was reset, or it belongs to another browser session.")
        shown = [
            {"role": turn.role, "text": turn.text, "images": [{"digest": image.digest, "name": image.name} for image in turn.images]}
            for turn in turns
        ]
        busy = bool(self._replies.get(key))
        return web.json_response({"id": key.thread, "title": _title(turns), "turns": shown, "busy": busy}, headers={"Cache-Control": "no-store"})

    async def _image(self, request: web.Request) -> web.Response:
        key, digest = self._key(request), request.match_info["digest"]
        if not _DIGEST.fullmatch(digest):
            return json_error(404, "No such image.")
        turns = await self.platform.turns(key)
        ref = next((image for turn in turns for image in turn.images if image.digest == digest), None)
        if ref is None:  # only images of this session's own conversation
            return json_error(404, "No such image in this conversation.")
        image = await self.platform.image(ref)
        kind = "image/png" if image.data.startswith(b"\x89PNG") else "image/jpeg"
        return web.Response(body=image.data, content_type=kind, headers={"Cache-Control": "private, max-age=86400"})

    async def _reset(self, request: web.Request) -> web.Response:
        key = self._key(request)
        self._cancel(key)
        forgotten = await self.platform.reset(key)
        log.info("web.reset", extra={"conversation": str(key), "turns": forgotten})
        return web.json_response({"forgotten": forgotten})

    async def _stop_replies(self, request: web.Request) -> web.Response:
        key = self._key(request)
        stopped = self._cancel(key)
        log.info("web.stopped_reply", extra={"conversation": str(key), "replies": stopped})
        return web.json_response({"stopped": stopped})

    def _cancel(self, key: ConversationKey) -> int:
        tasks = self._replies.get(key, set())
        for task in tasks:
            task.cancel()
        return len(tasks)

    # -- messages ----------------------------------------------------------------------------

    async def _post_message(self, request: web.Request) -> web.StreamResponse:
        """Where a browser's message becomes a turn and its reply: read the form, start the reply,
        stream its events to the page as JSON lines."""
        new = request.match_info["conversation"] == "new"
        key = ConversationKey(self.name, request[USER], secrets.token_hex(8)) if new else self._key(request)
        try:
            form = await read_form(request, self.form_limits, self.uploads)
        except FormRefused as refused:
            answer = json_error(refused.status, str(refused))
            if refused.status in (408, 413):
                answer.force_close()  # the rest of the body isn't worth reading
            return answer
        message = IncomingMessage(key, Author(request[USER], "you"), form.text, tuple(form.attachments()), message_id=secrets.token_hex(8))
        self.platform.record("message")
        events: asyncio.Queue[ReplyEvent | _Stopped] = asyncio.Queue()
        task = self.platform.spawn(self._answer(message, events), "reply")
        self._replies.setdefault(key, set()).add(task)
        task.add_done_callback(lambda done: self._forget_reply(key, done, form))

        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson; charset=utf-8", "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        try:
            await _send(response, {"type": "conversation", "id": key.thread})
            async for update in _updates(events):
                await _send(response, update)
            await response.write_eof()
        except ConnectionResetError:
            pass  # the page went away; the reply goes on and is stored for when it comes back
        return response

    def _forget_reply(self, key: ConversationKey, task: asyncio.Task, form: Form) -> None:
        form.release()
        if form.files and self.uploads.free == self.uploads.total:  # the last upload in flight is done with
            give_memory_back()
        running = self._replies.get(key, set())
        running.discard(task)
        if not running:
            self._replies.pop(key, None)

    async def _answer(self, message: IncomingMessage, events: asyncio.Queue) -> None:
        started = asyncio.get_running_loop().time()
        final: Final | None = None
        try:
            # Read to the end, never left early: Stop's cancellation arrives inside the reply's own
            # awaits, so its clean-up (freeing the model, taking the question back) runs right then.
            async for event in self.platform.reply(message):
                events.put_nowait(event)
                if isinstance(event, Final):
                    final = event
        except asyncio.CancelledError:
            events.put_nowait(_Stopped())
            raise
        except Exception:
            events.put_nowait(Final("", (_FAILED,)))
            log.exception("web.reply_failed", extra={"conversation": str(message.key)})
            return
        log.info(
            "web.replied",
            extra={"conversation": str(message.key), "answered": bool(final and final.text), "seconds": round(asyncio.get_running_loop().time() - started, 3)},
        )

    def _take_over(self, pending: Unanswered) -> None:
        self.platform.spawn(self.platform.resume(pending, LiveReply(_Unwatched(), limit=1_000_000), shared=False), "resume")


def _title(turns: list[Turn]) -> str:
    """A conversation's name in the list: its first question's first line."""
    first = next((turn for turn in turns if turn.role == "user"), None)
    if first is None:
        return "New conversation"
    line = next((line.strip() for line in first.text.splitlines() if line.strip()), "")
    if not line:
        return first.images[0].name if first.images else "New conversation"
    return line if len(line) <= _TITLE_CHARS else line[: _TITLE_CHARS - 1].rstrip() + "…"


async def _updates(events: asyncio.Queue) -> AsyncIterator[dict]:
    """The page's view of a reply's events, ending with a "final" update. Events that queued up
    while the page was being written to are sent as one update."""
    shown = ""
    while True:
        batch = [await events.get()]
        while not events.empty():
            batch.append(events.get_nowait())
        end = next((event for event in batch if isinstance(event, (Final, _Stopped))), None)
        if isinstance(end, Final):
            yield {"type": "final", "text": end.text, "notes": list(end.notes)}
            return
        if isinstance(end, _Stopped):
            yield {"type": "final", "text": shown, "notes": [STOPPED], "stopped": True}
            return
        latest = batch[-1]
        if isinstance(latest, Waiting):
            yield {"type": "status", "text": waiting_text(latest.position)}
        elif isinstance(latest, Working):
            yield {"type": "status", "text": WRITING}
        elif isinstance(latest, Partial):
            if latest.text.startswith(shown):
                yield {"type": "delta", "text": latest.text[len(shown) :]}
            else:
                yield {"type": "text", "text": latest.text}
            shown = latest.text


async def _send(response: web.StreamResponse, update: dict) -> None:
    await response.write(json.dumps(update, ensure_ascii=False).encode() + b"\n")
