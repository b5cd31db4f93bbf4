"""A fake Slack on 127.0.0.1, for driving the real slack-bolt app of the bot.

It serves what the bot reaches through `[slack] api_base_url`: the Web API methods it calls (recorded,
with query, form and JSON parameters merged, as slack_sdk sends all three), a file host that wants the
bot token and a token with `files:read` and otherwise answers 200 with an HTML login page (as Slack
does), public images for links, `response_url` endpoints, and a Socket Mode websocket. A test acts as
Slack itself: it builds events, signs them as Slack signs them and POSTs them to the bot's HTTP
endpoint, or pushes them through the socket and waits for the acknowledgement. Unknown routes answer
404 and are remembered, so a test can fail on them. Every record is a `Journal` a test can wait on.

Slack's AI-app surface is here too: `assistant.threads.setStatus/setSuggestedPrompts/setTitle` (with
the `assistant:write` scope; prompts and titles only in assistant threads, which a test opens with
`assistant_thread_started`), native streaming (`chat.startStream/appendStream/stopStream`: a stream
replies in a thread, names its recipient and the recipient's own team outside DMs, takes no text once
stopped or once Slack closed it (`close_stream`), and can't be edited with `chat.update` while it
streams; `refuse_streaming` makes the workspace refuse the method), channels the bot is not in
(`outside`: posts there answer `not_in_channel`), people of other teams (`teams`, as in a Slack Connect
channel, whose messages carry `user_team`), Block
Kit on messages (checked as Slack checks it: known block types, unique `action_id`s), and the
interactivity payloads (`block_actions` for a button that is on a message the bot posted, and the
`message_action` of a message shortcut), sent to the app over HTTP (signed, form-encoded) or as
Socket Mode `interactive` envelopes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import WSMsgType, web

from tests.loopback import serve, stream_oversized

BOT_TOKEN = "xoxb-test-bot-token"
APP_TOKEN = "xapp-test-app-token"
SIGNING_SECRET = "test-signing-secret"
BOT_USER, BOT_ID, TEAM = "UBOT0001", "BBOT0001", "T0000001"
ALL_SCOPES = ("app_mentions:read", "assistant:write", "chat:write", "files:read", "im:history", "channels:history", "reactions:write", "commands")
STREAM_TEXT_LIMIT = 12_000  # markdown_text per streaming call
MAX_SUGGESTED_PROMPTS = 4
# Block types a message may carry (the ones a bot posts); interactive elements live in the last two.
BLOCK_TYPES = frozenset({"section", "context", "divider", "header", "markdown", "rich_text", "image", "actions", "context_actions"})
LOGIN_PAGE = "<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in to your workspace</body></html>"


class Journal:
    """A growing list of things that happened, which a test can wait on (instead of sleeping)."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[list], Any], timeout: float = 60.0) -> Any:
        """The first truthy value of `predicate(items)`, re-checked whenever an item arrives."""
        async with asyncio.timeout(timeout):
            while True:
                found = predicate(self.items)
                if found:
                    return found
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Call:
    """One Web API request of the bot."""

    method: str
    params: dict[str, Any]
    token: str
    at: float  # time.monotonic()


@dataclass
class Posted:
    """A message the bot posted, with every text it had (the first, then each edit)."""

    channel: str
    ts: str
    thread_ts: str | None
    texts: list[str] = field(default_factory=list)
    metadata: dict | None = None
    blocks: list[dict] = field(default_factory=list)  # as last set (Slack gives each a block_id)
    streaming: bool | None = None  # None: an ordinary message; True: a stream still open; False: stopped
    recipient: str | None = None  # the user a stream was started for
    recipient_team: str | None = None  # and their team

    @property
    def text(self) -> str:
        return self.texts[-1]

    def actions(self) -> dict[str, tuple[str, dict]]:
        """The interactive elements on the message now: action_id -> (block_id, element)."""
        return {
            element["action_id"]: (block["block_id"], element)
            for block in self.blocks
            for element in block.get("elements", [])
            if isinstance(element, dict) and "action_id" in element
        }


@dataclass
class Failure:
    """An error answer to a coming Web API call (see `FakeSlack.fail`). With `after`, the call takes
    effect before the error (Slack posted the message, then answered 500), as Slack warns its
    `internal_error` can. With `channel`, only calls about that channel fail; `lasting` ones never run out."""

    status: int
    error: str = "internal_error"
    retry_after: int = 1  # for 429
    after: bool = False
    channel: str | None = None
    lasting: bool = False


@dataclass
class Delivery:
    """The bot's HTTP answer to an event or command, and how long it took."""

    status: int
    body: str
    seconds: float


def sign(body: bytes, timestamp: str, secret: str = SIGNING_SECRET) -> str:
    """Slack's request signature: v0=HMAC-SHA256(secret, "v0:{timestamp}:{body}")."""
    return "v0=" + hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()


class BlockError(ValueError):
    """Blocks Slack would refuse (`invalid_blocks`)."""


def checked_blocks(blocks: Any) -> list[dict]:
    """`blocks` as Slack stores them (a block_id on each), or BlockError where Slack says invalid_blocks."""
    if isinstance(blocks, str):  # form-encoded calls send them as JSON text
        blocks = json.loads(blocks)
    if not isinstance(blocks, list) or len(blocks) > 50:
        raise BlockError("blocks must be a list of at most 50")
    stored, action_ids = [], set()
    for index, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") not in BLOCK_TYPES:
            raise BlockError(f"block {index} has an unknown type")
        for element in block.get("elements", []) if block["type"] in ("actions", "context_actions") else []:
            action_id = element.get("action_id")
            if not isinstance(action_id, str) or not 0 < len(action_id) <= 255 or action_id in action_ids:
                raise BlockError(f"block {index}: every interactive element needs an action_id of its own")
            if (element.get("type") == "feedback_buttons") != (block["type"] == "context_actions"):
                raise BlockError(f"block {index}: feedback buttons go in a context_actions block, and only they do")
            action_ids.add(action_id)
        stored.append({"block_id": f"b{index}", **block})  # Slack names the blocks that come without a block_id
    return stored


class FakeSlack:
    """`async with FakeSlack() as slack:` runs it on 127.0.0.1."""

    def __init__(self, scopes: tuple[str, ...] = ALL_SCOPES):
        self.scopes = scopes
        self.calls = Journal()  # Call
        self.responses = Journal()  # (response_url id, JSON body) posted to a response_url
        self.acks = Journal()  # Socket Mode acknowledgements, as sent
        self.messages: dict[str, Posted] = {}
        self.unexpected: list[str] = []
        self.rate_limited_updates = 0  # answer this many coming chat.update calls with 429
        self.retry_after = 1
        self.failures: dict[str, list[Failure]] = {}  # method -> errors for its coming calls, in order
        self.failed = Journal()  # (method, status, params) of each call answered with an injected error
        self.deleted: list[Posted] = []  # the bot's messages it deleted (chat.delete)
        self.refuse_streaming: str | None = None  # chat.startStream answers this error when set
        self.outside: set[str] = set()  # channels the bot is not a member of
        self.streams_close_at_once = False  # Slack ends each stream right after it starts (see close_stream)
        self.teams: dict[str, str] = {}  # user -> their team, where it is not TEAM (Slack Connect)
        self.statuses = Journal()  # (channel, thread_ts, status) of each assistant.threads.setStatus
        self.titles: dict[tuple[str, str], str] = {}  # assistant thread -> its title
        self.suggested: dict[tuple[str, str | None], list[dict]] = {}  # assistant thread -> its suggested prompts
        self.assistant_threads: set[tuple[str, str]] = set()  # (DM channel, thread_ts) opened in the assistant panel
        self._files: dict[str, tuple[bytes, str]] = {}
        self._oversized: dict[str, int] = {}
        self.file_sent: dict[str, int] = {}
        self._file_objects: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/files/{name}", self._file)
        app.router.add_get("/redirect/{name}", self._redirect)
        app.router.add_get("/elsewhere/{name}", self._elsewhere)
        app.router.add_get("/images/{name}", self._image)
        app.router.add_post("/respond/{id}", self._respond)
        app.router.add_get("/socket", self._socket)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc_info) -> None:
        for socket in self._sockets:
            await socket.close()
        await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def api_url(self) -> str:
        return self.url("/api/")

    # -- what the test sets up ---------------------------------------------------------------

    def next_ts(self) -> str:
        number = next(self._ids)
        return f"{int(time.time())}.{number:06d}"

    def fail(self, method: str, *failures: Failure) -> None:
        """Answer the coming calls of `method` (a Web API method, or "response_url" for the posts to
        slash commands' response URLs) with these errors, one call each, in order."""
        self.failures.setdefault(method, []).extend(failures)

    def add_file(self, name: str, data: bytes, mimetype: str = "image/png", route: str = "files", *, served_bytes: int | None = None) -> dict:
        """Host `data` and return the Slack file object a message would carry (`route`: "files",
        "redirect" (same host) or "elsewhere" (redirects to another host name)). With `served_bytes`
        the file host sends that many bytes while the file object says len(data); `file_sent[name]`
        counts what it got to send."""
        self._files[name] = (data, mimetype)
        if served_bytes is not None:
            self._oversized[name] = served_bytes
        file = {
            "id": f"F{next(self._ids):08d}",
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": mimetype.rpartition("/")[2],
            "size": len(data),
            "mode": "hosted",
            "url_private": self.url(f"/{route}/{name}"),
        }
        self._file_objects[file["id"]] = file
        return file

    def add_image(self, name: str, data: bytes, mimetype: str = "image/png") -> str:
        """A public image link (for the slash command)."""
        self._files[name] = (data, mimetype)
        return self.url(f"/images/{name}")

    def message(self, channel: str, user: str, text: str = "", *, files=(), thread_ts=None, channel_type="channel", name=None) -> dict:
        """A `message` event as Slack sends it (subtype file_share when files come with it; the sender's
        team in `team` and `user_team`, the workspace it was sent from in `source_team`)."""
        ts = self.next_ts()
        team = self.team_of(user)
        event = {"type": "message", "channel": channel, "user": user, "text": text, "ts": ts, "event_ts": ts, "channel_type": channel_type, "team": team}
        event |= {"user_team": team, "source_team": team}
        if name:
            event["user_profile"] = {"display_name": name, "real_name": name, "name": name.lower()}
        if files:
            event["subtype"], event["files"], event["upload"] = "file_share", list(files), False
        if thread_ts:
            event["thread_ts"] = thread_ts
        return event

    def mention(self, channel: str, user: str, text: str, **kwargs) -> dict:
        """An `app_mention` event: a message that starts with the bot's mention."""
        event = self.message(channel, user, f"<@{BOT_USER}> {text}", **kwargs)
        event["type"] = "app_mention"
        event.pop("channel_type")
        event.pop("subtype", None)
        return event

    def assistant_thread_started(self, channel: str, user: str, *, context_channel: str | None = None) -> dict:
        """An `assistant_thread_started` event: `user` opened the assistant panel (a new thread in the
        DM `channel`), seen from `context_channel` if they were looking at one."""
        ts = self.next_ts()
        self.assistant_threads.add((channel, ts))
        context = {"channel_id": context_channel, "team_id": TEAM, "enterprise_id": None} if context_channel else {}
        thread = {"user_id": user, "context": context, "channel_id": channel, "thread_ts": ts}
        return {"type": "assistant_thread_started", "assistant_thread": thread, "event_ts": self.next_ts()}

    def assistant_context_changed(self, started: dict, context_channel: str) -> dict:
        """The `assistant_thread_context_changed` event of a thread `started` earlier: its user looks at another channel."""
        thread = {**started["assistant_thread"], "context": {"channel_id": context_channel, "team_id": TEAM, "enterprise_id": None}}
        return {"type": "assistant_thread_context_changed", "assistant_thread": thread, "event_ts": self.next_ts()}

    def team_of(self, user: str) -> str:
        return self.teams.get(user, TEAM)

    def close_stream(self, posted: Posted) -> None:
        """Slack ends the stream `posted` on its own (as it does to long streams): it takes no more text."""
        assert posted.streaming, "that message is not a stream being written"
        posted.streaming = False

    def _user(self, user: str) -> dict:
        return {"id": user, "username": user.lower(), "name": user.lower(), "team_id": self.team_of(user)}

    def click(self, posted: Posted, action_id: str, user: str, *, value: str | None = None) -> dict:
        """The `block_actions` payload of `user` pressing the element `action_id` on the bot's message
        `posted` (for feedback buttons, `value` picks the positive or negative one). Slack only sends
        clicks on elements that are on the message now, so anything else fails the test here."""
        found = posted.actions().get(action_id)
        assert found is not None, f"there is no {action_id!r} on that message; it has {sorted(posted.actions())}"
        block_id, element = found
        action = {"type": element["type"], "action_id": action_id, "block_id": block_id, "action_ts": self.next_ts()}
        if element["type"] == "feedback_buttons":
            buttons = {element[side]["value"]: element[side] for side in ("positive_button", "negative_button")}
            assert value in buttons, f"feedback buttons {sorted(buttons)} have no {value!r}"
            action |= {"value": value, "text": buttons[value]["text"]}
        else:
            action |= {"text": element.get("text"), **({"value": element["value"]} if "value" in element else {})}
        container = {"type": "message", "message_ts": posted.ts, "channel_id": posted.channel, "is_ephemeral": False}
        message = {"type": "message", "ts": posted.ts, "text": posted.text, "bot_id": BOT_ID, "user": BOT_USER, "blocks": posted.blocks}
        if posted.thread_ts:
            container["thread_ts"] = message["thread_ts"] = posted.thread_ts
        return {
            "type": "block_actions",
            "user": self._user(user),
            "api_app_id": "A0000001",
            "token": "verification-token-unused",
            "container": container,
            "trigger_id": f"trigger-{self.next_ts()}",
            "team": {"id": TEAM, "domain": "test"},
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": posted.channel, "name": "directmessage" if posted.channel.startswith("D") else "general"},
            "message": message,
            "state": {"values": {}},
            "response_url": self.url(f"/respond/R{next(self._ids):08d}"),
            "actions": [action],
        }

    def shortcut(self, callback_id: str, message: dict, user: str) -> dict:
        """The `message_action` payload of `user` running the message shortcut `callback_id` on
        `message` (a message event, as from `message`)."""
        shown = {key: value for key, value in message.items() if key not in ("channel", "channel_type", "event_ts")}
        return {
            "type": "message_action",
            "token": "verification-token-unused",
            "action_ts": self.next_ts(),
            "team": {"id": TEAM, "domain": "test"},
            "user": self._user(user),
            "channel": {"id": message["channel"], "name": "directmessage" if message["channel"].startswith("D") else "general"},
            "is_enterprise_install": False,
            "enterprise": None,
            "callback_id": callback_id,
            "trigger_id": f"trigger-{self.next_ts()}",
            "response_url": self.url(f"/respond/R{next(self._ids):08d}"),
            "message_ts": message["ts"],
            "message": shown,
        }

    def envelope(self, event: dict, event_id: str | None = None) -> dict:
        """The Events API body around `event`."""
        return {
            "token": "verification-token-unused",
            "team_id": TEAM,
            "api_app_id": "A0000001",
            "event": event,
            "type": "event_callback",
            "event_id": event_id or f"Ev{next(self._ids):08d}",
            "event_time": int(time.time()),
            "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True, "is_enterprise_install": False}],
            "is_ext_shared_channel": False,
        }

    # -- acting as Slack ---------------------------------------------------------------------

    async def deliver(self, endpoint: str, body: dict, *, retry: int | None = None, secret: str = SIGNING_SECRET, age: float = 0.0) -> Delivery:
        """POST an Events API body, signed (with `secret`, `age` seconds ago), as Slack does."""
        raw = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        return await self._post(endpoint, raw, headers, secret, age)

    async def interact(self, endpoint: str, payload: dict) -> Delivery:
        """POST an interactivity payload (`click`, `shortcut`) as Slack does: signed, form-encoded `payload=`."""
        raw = urlencode({"payload": json.dumps(payload)}).encode()
        return await self._post(endpoint, raw, {"Content-Type": "application/x-www-form-urlencoded"}, SIGNING_SECRET, 0.0)

    async def command(self, endpoint: str, text: str, *, channel: str = "C0000001", user: str = "U0000001", command: str = "/idefics") -> tuple[Delivery, str]:
        """Run a slash command; returns the bot's acknowledgement and the command's response_url id."""
        response_id = f"R{next(self._ids):08d}"
        form = self.command_payload(text, channel=channel, user=user, command=command, response_id=response_id)
        raw = urlencode(form).encode()
        delivery = await self._post(endpoint, raw, {"Content-Type": "application/x-www-form-urlencoded"}, SIGNING_SECRET, 0.0)
        return delivery, response_id

    def command_payload(self, text: str, *, channel: str, user: str, command: str, response_id: str) -> dict:
        return {
            "token": "verification-token-unused",
            "team_id": TEAM,
            "team_domain": "test",
            "channel_id": channel,
            "channel_name": "directmessage" if channel.startswith("D") else "general",
            "user_id": user,
            "user_name": user.lower(),
            "command": command,
            "text": text,
            "api_app_id": "A0000001",
            "response_url": self.url(f"/respond/{response_id}"),
            "trigger_id": f"trigger-{response_id}",
        }

    async def deliver_raw(
        self, endpoint: str, raw: bytes, content_type: str = "application/json", *, signed: bool = True, timestamp: str | None = None
    ) -> Delivery:
        """POST any bytes: signed with the real secret (over `timestamp`, if given, instead of now),
        or with a signature that doesn't match."""
        timestamp = timestamp if timestamp is not None else str(int(time.time()))
        signature = sign(raw, timestamp) if signed else "v0=" + "0" * 64
        return await self._post(endpoint, raw, {"Content-Type": content_type}, SIGNING_SECRET, 0.0, (timestamp, signature))

    async def _post(self, endpoint: str, raw: bytes, headers: dict, secret: str, age: float, stamp: tuple[str, str] | None = None) -> Delivery:
        timestamp = str(int(time.time() - age))
        timestamp, signature = stamp or (timestamp, sign(raw, timestamp, secret))
        headers = {**headers, "X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": signature}
        started = time.monotonic()
        async with aiohttp.ClientSession() as session, session.post(endpoint, data=raw, headers=headers) as response:
            return Delivery(response.status, await response.text(), time.monotonic() - started)

    async def drop_sockets(self) -> None:
        """Close every Socket Mode connection from Slack's side, without a goodbye."""
        for socket in self._sockets:
            await socket.close()

    async def push(self, envelope_type: str, payload: dict, *, retry: int = 0) -> str:
        """Send a Socket Mode envelope over the bot's socket; returns its envelope_id."""
        envelope_id = f"env-{next(self._ids)}"
        message = {"envelope_id": envelope_id, "type": envelope_type, "payload": payload, "accepts_response_payload": envelope_type != "events_api"}
        if envelope_type == "events_api":
            message |= {"retry_attempt": retry, "retry_reason": "timeout" if retry else ""}
        await self._sockets[-1].send_str(json.dumps(message))
        return envelope_id

    # -- what the test reads -----------------------------------------------------------------

    def thread(self, channel: str, thread_ts: str | None) -> list[Posted]:
        """The bot's messages in a thread (or, with None, at the top level of a channel), oldest first."""
        return [m for m in self.messages.values() if m.channel == channel and m.thread_ts == thread_ts]

    def api(self, method: str) -> list[Call]:
        return [call for call in self.calls.items if call.method == method]

    # -- the server --------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                params |= await request.json()
            else:
                params |= dict(await request.post())
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.calls.add(Call(method, params, token, time.monotonic()))
        handler = getattr(self, "_api_" + method.replace(".", "_"), None)
        if handler is None:
            self.unexpected.append(f"{request.method} {request.path}")
            return web.json_response({"ok": False, "error": "unknown_method"}, status=404)
        expected = APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN
        if token != expected:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        failure = self._failure(method, params)
        if failure is None:
            return await handler(params)
        if failure.after:
            await handler(params)
        self.failed.add((method, failure.status, params))
        headers = {"Retry-After": str(failure.retry_after)} if failure.status == 429 else {}
        return web.json_response({"ok": False, "error": failure.error}, status=failure.status, headers=headers)

    def _failure(self, method: str, params: dict) -> Failure | None:
        queue = self.failures.get(method, [])
        failure = next((f for f in queue if f.channel is None or f.channel == params.get("channel")), None)
        if failure is not None and not failure.lasting:
            queue.remove(failure)
        return failure

    async def _api_auth_test(self, params: dict) -> web.Response:
        body = {
            "ok": True,
            "url": self.url("/"),
            "team": "Test",
            "user": "idefics",
            "team_id": TEAM,
            "user_id": BOT_USER,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }
        return web.json_response(body, headers={"x-oauth-scopes": ",".join(self.scopes)})

    async def _api_chat_postMessage(self, params: dict) -> web.Response:
        if params.get("channel") in self.outside:
            return _error("not_in_channel")
        try:
            blocks = checked_blocks(params["blocks"]) if params.get("blocks") else []
        except BlockError:
            return _error("invalid_blocks")
        ts = self.next_ts()
        posted = Posted(params["channel"], ts, params.get("thread_ts"), [params.get("text", "")], params.get("metadata"), blocks)
        self.messages[ts] = posted
        return web.json_response(
            {"ok": True, "channel": posted.channel, "ts": ts, "message": {"type": "message", "text": posted.text, "ts": ts, "bot_id": BOT_ID, "user": BOT_USER}}
        )

    async def _api_chat_update(self, params: dict) -> web.Response:
        if self.rate_limited_updates:
            self.rate_limited_updates -= 1
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(self.retry_after)})
        posted = self.messages.get(params["ts"])
        if posted is None or posted.channel != params["channel"]:
            return _error("message_not_found")
        if posted.streaming:
            return _error("cant_update_message")  # a stream changes through appendStream/stopStream only
        try:
            blocks = checked_blocks(params["blocks"]) if "blocks" in params else posted.blocks
        except BlockError:
            return _error("invalid_blocks")
        posted.texts.append(params.get("text", ""))
        posted.blocks = blocks
        return web.json_response({"ok": True, "channel": posted.channel, "ts": posted.ts, "text": posted.text})

    async def _api_chat_delete(self, params: dict) -> web.Response:
        posted = self.messages.get(params.get("ts", ""))
        if posted is None or posted.channel != params.get("channel"):
            return _error("message_not_found")  # a bot token deletes only the bot's own messages
        del self.messages[posted.ts]
        self.deleted.append(posted)
        return web.json_response({"ok": True, "channel": posted.channel, "ts": posted.ts})

    # Native streaming: one message that grows, then is stopped; Slack rejects text after the stop.

    async def _api_chat_startStream(self, params: dict) -> web.Response:
        if self.refuse_streaming:
            return _error(self.refuse_streaming)
        channel, thread_ts = params.get("channel"), params.get("thread_ts")
        if not channel or not thread_ts:
            return _error("invalid_arguments")  # a stream always answers in a thread
        if channel in self.outside:
            return _error("not_in_channel")
        recipient, team = params.get("recipient_user_id"), params.get("recipient_team_id")
        if not channel.startswith("D") and not recipient:
            return _error("missing_recipient_user_id")  # outside DMs a stream names who it is for
        if not channel.startswith("D") and not team:
            return _error("missing_recipient_team_id")
        if recipient and team and team != self.team_of(recipient):
            return _error("user_not_found")  # no such user in that team
        text = _stream_text(params)
        if text is None:
            return _error("msg_too_long")
        ts = self.next_ts()
        self.messages[ts] = Posted(channel, ts, thread_ts, [text], streaming=not self.streams_close_at_once, recipient=recipient, recipient_team=team)
        return web.json_response({"ok": True, "channel": channel, "ts": ts})

    async def _api_chat_appendStream(self, params: dict) -> web.Response:
        posted, refusal = self._stream(params)
        if refusal is not None:
            return refusal
        text = _stream_text(params)
        if text is None:
            return _error("msg_too_long")
        if text:
            posted.texts.append(posted.text + text)
        return web.json_response({"ok": True, "channel": posted.channel, "ts": posted.ts})

    async def _api_chat_stopStream(self, params: dict) -> web.Response:
        posted, refusal = self._stream(params)
        if refusal is not None:
            return refusal
        text = _stream_text(params)
        if text is None:
            return _error("msg_too_long")
        try:
            blocks = checked_blocks(params["blocks"]) if params.get("blocks") else []
        except BlockError:
            return _error("invalid_blocks")
        posted.texts.append(posted.text + text)
        posted.blocks, posted.streaming = blocks, False
        if params.get("metadata"):
            posted.metadata = params["metadata"]
        return web.json_response({"ok": True, "channel": posted.channel, "ts": posted.ts, "message": {"type": "message", "text": posted.text, "ts": posted.ts}})

    def _stream(self, params: dict) -> tuple[Posted, None] | tuple[None, web.Response]:
        posted = self.messages.get(params.get("ts", ""))
        if posted is None or posted.channel != params.get("channel"):
            return None, _error("message_not_found")
        if not posted.streaming:
            return None, _error("message_not_in_streaming_state")
        return posted, None

    # The assistant panel.

    async def _api_assistant_threads_setStatus(self, params: dict) -> web.Response:
        refusal = self._assistant_call(params, ("status",))
        if refusal is None:
            self.statuses.add((params["channel_id"], params["thread_ts"], params["status"]))
        return refusal or web.json_response({"ok": True})

    async def _api_assistant_threads_setTitle(self, params: dict) -> web.Response:
        refusal = self._assistant_call(params, ("title",), panel_only=True)
        if refusal is None:
            self.titles[(params["channel_id"], params["thread_ts"])] = params["title"]
        return refusal or web.json_response({"ok": True})

    async def _api_assistant_threads_setSuggestedPrompts(self, params: dict) -> web.Response:
        refusal = self._assistant_call(params, ("prompts",), panel_only=True)
        prompts = params.get("prompts")
        if isinstance(prompts, str):
            prompts = json.loads(prompts)
        if refusal is None and not (
            isinstance(prompts, list) and 0 < len(prompts) <= MAX_SUGGESTED_PROMPTS and all(p.get("title") and p.get("message") for p in prompts)
        ):
            refusal = _error("invalid_arguments")
        if refusal is None:
            self.suggested[(params["channel_id"], params["thread_ts"])] = prompts
        return refusal or web.json_response({"ok": True})

    def _assistant_call(self, params: dict, required: tuple[str, ...], *, panel_only: bool = False) -> web.Response | None:
        """Slack's refusal of an assistant.threads call, or None: it wants `assistant:write`, a thread,
        the `required` arguments (a status may be "", which clears it), and for titles and suggested
        prompts a thread of the assistant panel."""
        if "assistant:write" not in self.scopes:
            return web.json_response({"ok": False, "error": "missing_scope", "needed": "assistant:write", "provided": ",".join(self.scopes)})
        if not params.get("channel_id") or not params.get("thread_ts") or any(params.get(name) is None for name in required):
            return _error("invalid_arguments")
        if panel_only and (params["channel_id"], params["thread_ts"]) not in self.assistant_threads:
            return _error("thread_not_found")
        return None

    async def _api_conversations_replies(self, params: dict) -> web.Response:
        return self._history(params, lambda m: m.thread_ts == params["ts"] or m.ts == params["ts"])

    async def _api_conversations_history(self, params: dict) -> web.Response:
        return self._history(params, lambda m: m.thread_ts is None)

    def _history(self, params: dict, where: Callable[[Posted], bool]) -> web.Response:
        """The bot's messages in a channel (that `where` selects), from `oldest` on; metadata only if asked."""
        oldest = float(params.get("oldest", 0))
        metadata = str(params.get("include_all_metadata", "")).lower() in ("1", "true")
        found = [m for m in self.messages.values() if m.channel == params["channel"] and where(m) and float(m.ts) >= oldest]
        messages = [
            {"type": "message", "ts": m.ts, "text": m.text, "bot_id": BOT_ID, "user": BOT_USER, **({"thread_ts": m.thread_ts} if m.thread_ts else {}),
             **({"metadata": m.metadata} if metadata and m.metadata else {})}
            for m in found
        ]  # fmt: skip
        return web.json_response({"ok": True, "messages": messages, "has_more": False})

    async def _api_apps_connections_open(self, params: dict) -> web.Response:
        return web.json_response({"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"})

    async def _api_files_info(self, params: dict) -> web.Response:
        file = self._file_objects.get(params.get("file", ""))
        return web.json_response({"ok": True, "file": file} if file else {"ok": False, "error": "file_not_found"})

    async def _file(self, request: web.Request) -> web.Response:
        # Slack's file host: the file for a bot token with files:read, the login page for anything else.
        name = request.match_info["name"]
        authorized = request.headers.get("Authorization") == f"Bearer {BOT_TOKEN}" and "files:read" in self.scopes
        if name not in self._files or not authorized:
            return web.Response(text=LOGIN_PAGE, content_type="text/html")
        data, mimetype = self._files[name]
        if name in self._oversized:
            self.file_sent[name] = 0
            return await stream_oversized(request, data, self._oversized[name], mimetype, lambda count: self.file_sent.__setitem__(name, count))
        return web.Response(body=data, content_type=mimetype)

    async def _redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"/files/{request.match_info['name']}")

    async def _elsewhere(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://localhost:{self.port}/files/{request.match_info['name']}")

    async def _image(self, request: web.Request) -> web.Response:
        data, mimetype = self._files[request.match_info["name"]]
        return web.Response(body=data, content_type=mimetype)

    async def _respond(self, request: web.Request) -> web.Response:
        body = await request.json()
        failure = self._failure("response_url", {})
        if failure is None or failure.after:
            self.responses.add((request.match_info["id"], body))
        if failure is None:
            return web.Response(text="ok")
        self.failed.add(("response_url", failure.status, body))
        headers = {"Retry-After": str(failure.retry_after)} if failure.status == 429 else {}
        return web.Response(status=failure.status, text=failure.error, headers=headers)

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.append(socket)
        await socket.send_json({"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0000001"}})
        async for message in socket:
            if message.type == WSMsgType.TEXT:
                self.acks.add(json.loads(message.data))
        return socket

    async def _unknown(self, request: web.Request) -> web.Response:
        self.unexpected.append(f"{request.method} {request.path}")
        return web.Response(status=404, text="not found")


def _error(error: str) -> web.Response:
    """A Web API error answer: HTTP 200 with ok false, as Slack sends most of them."""
    return web.json_response({"ok": False, "error": error})


def _stream_text(params: dict) -> str | None:
    """The text a streaming call adds (its markdown_text and markdown chunks), None if over Slack's limit."""
    chunks = params.get("chunks") or []
    if isinstance(chunks, str):
        chunks = json.loads(chunks)
    text = (params.get("markdown_text") or "") + "".join(c.get("text", "") for c in chunks if c.get("type") == "markdown_text")
    return text if len(text) <= STREAM_TEXT_LIMIT else None
