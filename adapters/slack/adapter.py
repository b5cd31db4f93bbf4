"""The Slack adapter: IDEFICS as a workspace assistant in threads, DMs and the assistant panel, on
slack-bolt's `AsyncApp`.

    Slack event -> SlackAdapter._on_message -> _answer -> IncomingMessage -> Platform.answer -> Engine.reply
                -> SlackReply (a native stream, or LiveReply on a SlackThread) -> the thread

- A mention in a channel is answered in that message's thread; later messages in a thread the bot
  talks in continue the conversation without a mention. In DMs every message is a turn; a thread of
  a DM (as every chat of the assistant panel is) is a conversation of its own.
- The assistant panel (`slack_assistant`): a greeting and suggested prompts when a thread opens, its
  title from the first question, the status line while the model works.
- Bolt acknowledges each event before our listener runs; the work happens in a task of the adapter.
  Retries and re-deliveries are recognised by `event_id` (and the message's own ts, because a mention
  also arrives as a `message` event) in the store, so each message gets one answer, across restarts too.
- Replies stream natively in threads, or appear as a placeholder edited as the text comes, with Stop
  and feedback buttons (`slack_reply`, whose clicks `slack_actions` handles); posts and edits go
  through Slack's failures as `slack_delivery` says, and a reply that can't be posted in the end is
  logged with its conversation.
- The "Describe image" message shortcut answers in the thread of the message it was used on.
- At start-up, messages that a killed process stored but never answered are answered in their threads
  (in the messages it had begun), and what it had posted for a message it never stored is removed.
- Socket Mode (default, needs the app token) or HTTP mode (Bolt checks signatures and answers
  `url_verification`); events, commands and interactivity arrive the same way in both. The slash
  command lives in `slack_commands`, file downloads in `slack_files`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.actions import SlackActions
from adapters.slack.assistant import GREETING, PROMPTS, assistant, thread_title
from adapters.slack.blocks import DESCRIBE_IMAGE, FEEDBACK, STOP
from adapters.slack.commands import SlashCommands
from adapters.slack.delivery import SlackThread, retry_handlers
from adapters.slack.files import SlackFiles
from adapters.slack.http import request_check
from adapters.slack.reply import LOOKING, THINKING, Place, SlackReplies
from adapters.slack.text import plain_text
from bot.sdk.access import SILENT, AccessSettings, Requester, refusal_reason
from bot.sdk.platform import ConfigError, Platform
from ground.conversation import Author, ConversationKey, Unanswered
from ground.messages import IncomingMessage

log = logging.getLogger("adapters.slack")  # the platform's logger (as its Platform.log)

# Slack refuses messages around 4,000 characters (msg_too_long), and a section block (which carries the
# text when a message has buttons) holds 3,000.
MESSAGE_LIMIT = 3000
# The scopes the adapter uses, as slack-manifest.yml asks for them; a missing one gets a warning at start-up.
SCOPES = frozenset({"app_mentions:read", "assistant:write", "channels:history", "chat:write", "commands", "files:read", "im:history"})
DESCRIBE = "Describe this image in detail."
# Message subtypes that are somebody saying something (the others are edits, joins, deletions...).
_SAID = {None, "file_share", "thread_broadcast"}
_CONNECT_TIMEOUT_S = 30.0
_WATCH_EVERY_S = 1.0
_STOP_GRACE_S = 10.0


class SlackSettings(AccessSettings):
    """[slack]: the app's tokens, Socket Mode or HTTP mode, the slash command, and who may use it."""

    environment = {"bot_token": "SLACK_BOT_TOKEN", "app_token": "SLACK_APP_TOKEN", "signing_secret": "SLACK_SIGNING_SECRET"}

    bot_token: SecretStr | None = None
    app_token: SecretStr | None = None
    signing_secret: SecretStr | None = None
    mode: Literal["socket", "http"] = "socket"
    http_host: str = "0.0.0.0"
    http_port: int = Field(3000, ge=1, le=65535)
    events_path: str = "/slack/events"
    command: str = "/idefics"
    api_base_url: str | None = None
    # Socket Mode: slack_sdk reconnects a dropped connection by itself; one that stays down this
    # long ends `run` with exit status 1, for a service manager to restart the bot.
    reconnect_timeout_s: float = Field(120.0, gt=0)
    anyone_can_stop: bool = False  # the Stop button on a reply being written: its asker only, unless on
    native_streaming: bool = True  # replies in threads stream through chat.startStream where the workspace allows it

    @classmethod
    def secrets_needed(cls, section: Mapping[str, Any]) -> list[str]:
        """The bot token, plus the app token (Socket Mode) or the signing secret (HTTP mode)."""
        return ["bot_token", "signing_secret" if section.get("mode") == "http" else "app_token"]


def describe_error(error: BaseException) -> dict[str, Any]:
    """A failed Slack call for the logs: Slack's error code, or the connection error's type."""
    return {"error": error.response.get("error") if isinstance(error, SlackApiError) else type(error).__name__}


@dataclass(frozen=True)
class Identity:
    """Who the bot is in the workspace, as `auth.test` says; `scopes` is None if Slack didn't list them."""

    user_id: str
    bot_id: str
    team: str
    scopes: frozenset[str] | None


class SlackAdapter:
    """The bot in one Slack workspace."""

    name = "slack"
    Settings = SlackSettings
    delivery_errors = (SlackApiError, aiohttp.ClientError, TimeoutError)
    describe_error = staticmethod(describe_error)

    def __init__(self, platform: Platform, settings: SlackSettings):
        self.settings = settings
        self.images = platform.images
        self.platform = platform
        base_url = settings.api_base_url or AsyncWebClient.BASE_URL
        self.client = AsyncWebClient(
            token=settings.bot_token.get_secret_value() if settings.bot_token else None,
            base_url=base_url if base_url.endswith("/") else base_url + "/",  # method names are joined to it
            retry_handlers=retry_handlers(),
        )
        http = settings.mode == "http"
        self.app = AsyncApp(
            client=self.client,
            signing_secret=settings.signing_secret.get_secret_value() if http and settings.signing_secret else "",
            request_verification_enabled=http,  # Socket Mode messages come over our own authenticated socket
        )
        self.commands = SlashCommands(platform, settings, self.platform.spawn, MESSAGE_LIMIT, settings.command)
        self.replies = SlackReplies(
            self.client, platform, message_limit=MESSAGE_LIMIT, anyone_can_stop=settings.anyone_can_stop, native_streaming=settings.native_streaming
        )
        actions = SlackActions(platform, settings, self.replies)
        # The assistant's listeners come first: Bolt hands them the messages of DM threads.
        self.app.assistant(assistant(self._on_assistant_started, self._on_assistant_message))
        self.app.event("app_mention")(self._on_message)
        self.app.event("message")(self._on_message)
        self.app.command(settings.command)(self.commands.handle)
        self.app.action(STOP)(actions.on_stop)
        self.app.action(FEEDBACK)(actions.on_feedback)
        self.app.shortcut(DESCRIBE_IMAGE)(self._on_describe)
        self._identity: Identity | None = None  # both known once started
        self._files: SlackFiles | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._watch: asyncio.Task | None = None
        self.failed = asyncio.Event()  # set when the adapter gave up on its connection; `failure` says why
        self.failure: str | None = None
        self._server: web.AppRunner | None = None
        self._watching: asyncio.Task | None = None  # looks for questions that stopped processes left

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the bot token, then connect (Socket Mode) or listen (HTTP mode); returns when ready."""
        self._identity = await self._identify()
        self._files = SlackFiles(
            self.client,
            self.client.token or "",
            connect_timeout=self.images.connect_timeout_s,
            total_timeout=self.images.fetch_timeout_s,
            scopes=self.identity.scopes,
            extra_hosts=frozenset({(urlsplit(self.client.base_url).hostname or "").lower()}),  # a custom API root serves files too
        )
        if self.settings.mode == "http":
            await self._listen()
        else:
            await self._connect()
            self._watch = asyncio.create_task(self._watch_socket(), name="slack-socket-watch")
        await self.replies.writing.route(self.platform)  # Stop clicks that reach another process
        self._watching = asyncio.create_task(self.platform.watch_unanswered(self._take_over), name="slack-unanswered")
        log.info("slack.started", extra={"mode": self.settings.mode, "team": self.identity.team, "bot_user": self.identity.user_id})

    @property
    def identity(self) -> Identity:
        """Who the bot is in the workspace (asked at start-up)."""
        if self._identity is None:
            raise RuntimeError("The Slack adapter is not started.")
        return self._identity

    @property
    def files(self) -> SlackFiles:
        """Downloads of the files people post (set up at start-up)."""
        if self._files is None:
            raise RuntimeError("The Slack adapter is not started.")
        return self._files

    @property
    def connected(self) -> bool:
        """Whether Slack can reach the bot (for /healthz): the HTTP endpoint is listening, or the
        Socket Mode connection is open."""
        if self._server is not None:
            return True
        socket = self._socket.client if self._socket is not None else None
        return socket is not None and not socket.closed and socket.current_session is not None and not socket.current_session.closed

    async def _watch_socket(self) -> None:
        """Say when the Socket Mode connection drops and comes back; if it stays down for
        `reconnect_timeout_s`, give up: `failure` says why and `failed` is set."""
        loop = asyncio.get_running_loop()
        down_since: float | None = None
        while True:
            await asyncio.sleep(_WATCH_EVERY_S)
            if self.connected:
                if down_since is not None:
                    log.info("slack.reconnected", extra={"down_s": round(loop.time() - down_since, 1)})
                    down_since = None
                continue
            if down_since is None:
                down_since = loop.time()
                log.warning("slack.disconnected")
            elif loop.time() - down_since >= self.settings.reconnect_timeout_s:
                self.failure = f"the Socket Mode connection has been down for {loop.time() - down_since:.0f} s"
                log.error("slack.gave_up", extra={"down_s": round(loop.time() - down_since, 1)})
                self.failed.set()
                return

    async def stop(self) -> None:
        """Stop taking events, give replies in flight a moment to be posted, cancel the rest."""
        if self._watch is not None:
            self._watch.cancel()
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
            self._watching = None
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._server is not None:
            await self._server.cleanup()
            self._server = None
        await self.platform.drain(_STOP_GRACE_S)
        log.info("slack.stopped")

    async def _identify(self) -> Identity:
        try:
            response = await self.client.auth_test()
        except SlackApiError as error:
            raise ConfigError(
                f"Slack refused the bot token ({error.response.get('error')}): check [slack] bot_token or SLACK_BOT_TOKEN "
                "(the Bot User OAuth Token, xoxb-...)."
            ) from None
        except (aiohttp.ClientError, TimeoutError) as error:
            where = self.client.base_url
            raise ConfigError(f"Slack can't be reached at {where} ({type(error).__name__}): check the network or [slack] api_base_url.") from None
        listed = response.headers.get("x-oauth-scopes")
        scopes = frozenset(scope.strip() for scope in listed.split(",")) if listed is not None else None
        if scopes is not None and SCOPES - scopes:
            log.warning("slack.missing_scopes", extra={"missing": ",".join(sorted(SCOPES - scopes))})
        return Identity(response["user_id"], response.get("bot_id", ""), response.get("team_id", ""), scopes)

    async def _listen(self) -> None:
        host, port = self.settings.http_host, self.settings.http_port
        endpoint = self.app.web_app(path=self.settings.events_path)
        secret = self.settings.signing_secret  # required in HTTP mode: the settings say so at start-up
        endpoint.middlewares.append(request_check(secret.get_secret_value() if secret else ""))
        runner = web.AppRunner(endpoint, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as error:
            await runner.cleanup()
            raise ConfigError(f"Slack HTTP mode can't listen on {host}:{port} ({error.strerror}): free the port or change [slack] http_port.") from None
        self._server = runner

    async def _connect(self) -> None:
        app_token = self.settings.app_token.get_secret_value() if self.settings.app_token else ""
        try:
            opened = await self.client.apps_connections_open(app_token=app_token)
        except SlackApiError as error:
            raise ConfigError(
                f"Slack refused the app token ({error.response.get('error')}): check [slack] app_token or SLACK_APP_TOKEN "
                "(xapp-..., with the connections:write scope) and that Socket Mode is on for the app."
            ) from None
        handler = AsyncSocketModeHandler(self.app, app_token)
        handler.client.wss_uri = opened["url"]  # connect to this address rather than asking for another
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                await handler.connect_async()
        except TimeoutError:
            await handler.close_async()
            raise ConfigError(f"Slack's Socket Mode connection did not open within {_CONNECT_TIMEOUT_S:g} s: check the network.") from None
        self._socket = handler

    # -- messages ----------------------------------------------------------------------------

    async def _on_message(self, event: dict, body: dict, request: AsyncBoltRequest) -> None:
        """Bolt's listener for `app_mention` and `message` events (already acknowledged)."""
        retry = request.headers.get("x-slack-retry-num", ["0"])[0]
        self.platform.spawn(self._answer(event, body.get("event_id", ""), retry), event.get("type", "event"))

    async def _on_assistant_message(self, event: dict, body: dict, request: AsyncBoltRequest) -> None:
        """A message in a DM thread (an assistant-panel chat): as any message, and it may name the thread."""
        retry = request.headers.get("x-slack-retry-num", ["0"])[0]
        self.platform.spawn(self._answer(event, body.get("event_id", ""), retry, titled=True), "assistant-message")

    async def _on_assistant_started(self, event: dict, body: dict) -> None:
        """Someone opened a chat with the bot in the assistant panel: greet them, once."""
        self.platform.spawn(self._greet(event["assistant_thread"], body.get("event_id", "")), "assistant-started")

    async def _greet(self, thread: dict, event_id: str) -> None:
        channel, thread_ts, user = thread["channel_id"], thread["thread_ts"], thread.get("user_id", "")
        if refusal_reason(self.settings, Requester(user_id=user, channel_id=channel, is_dm=True)) is not None:
            return
        if not await self.platform.first_delivery(*filter(None, (event_id,)), event_id=event_id):
            return
        await SlackThread(self.client, channel, thread_ts).post(GREETING)
        await self.client.assistant_threads_setSuggestedPrompts(channel_id=channel, thread_ts=thread_ts, title="Try:", prompts=list(PROMPTS))
        log.info("slack.assistant_greeted", extra={"channel": channel})

    async def _answer(self, event: dict, event_id: str, retry: str, titled: bool = False) -> None:
        """Where a Slack message becomes a turn of a conversation and its reply."""
        route = await self._route(event, event_id)
        if route is None:
            return
        key, reply_thread = route
        # A retry repeats the event_id, and a mention also arrives as a `message` event with an id of
        # its own but the same channel and ts: either way, the message is answered once.
        if not await self.platform.first_delivery(*filter(None, (event_id, f"{event['channel']}/{event['ts']}")), event_id=event_id, retry=retry):
            return
        message = IncomingMessage(
            key=key,
            author=_author(event),
            text=plain_text(event.get("text", ""), self.identity.user_id),
            attachments=tuple(self.files.attachment(file) for file in event.get("files", [])),
            message_id=event["ts"],
            shared=event.get("channel_type") != "im",  # channels: several people talk; DMs: one
        )
        if titled and key.thread and not await self.platform.follows(key):
            self.platform.spawn(self._title(key, message.text), "assistant-title")
        working = LOOKING if message.attachments else THINKING
        reply = self.replies.reply(Place(event["channel"], reply_thread, message.author.id, self._team_of(event)), event["ts"], working)
        await self.platform.answer(message, reply, event_id=event_id)

    def _team_of(self, event: dict) -> str:
        """The team of the person who sent `event`: in a Slack Connect channel, maybe not the bot's."""
        return event.get("user_team") or event.get("team") or self.identity.team

    async def _title(self, key: ConversationKey, question: str) -> None:
        """Name an assistant-panel chat after its first question."""
        await self.client.assistant_threads_setTitle(channel_id=key.channel, thread_ts=key.thread, title=thread_title(question))

    # -- the message shortcut ----------------------------------------------------------------

    async def _on_describe(self, ack, shortcut: dict, respond) -> None:
        """"Describe image" on a message: the bot describes its images in the message's thread."""
        await ack()
        user, channel, message = shortcut["user"], shortcut["channel"]["id"], shortcut["message"]
        who = Requester(user_id=user["id"], channel_id=channel, is_dm=channel.startswith("D"))
        if refusal_reason(self.settings, who) is not None:
            self.platform.record("refused")
            await respond(text="Sorry, I'm not available to you here.", response_type="ephemeral")
            return
        files = [self.files.attachment(file) for file in message.get("files", [])]
        if not any(file.looks_like_image() for file in files):
            await respond(text="That message has no image attached.", response_type="ephemeral")
            return
        self.platform.spawn(self._describe(shortcut, files, respond), "describe-image")

    async def _describe(self, shortcut: dict, files: list, respond) -> None:
        user, channel, message = shortcut["user"], shortcut["channel"]["id"], shortcut["message"]
        root = message.get("thread_ts") or message["ts"]
        key = ConversationKey("slack", channel, root)
        await self.platform.follow(key, f"{channel}/{root}")  # follow-ups in the thread are for the bot
        name = user.get("name") or user.get("username") or user["id"]
        incoming = IncomingMessage(key, Author(user["id"], name), DESCRIBE, tuple(files), f"shortcut/{shortcut['action_ts']}", shared=True)
        reply = self.replies.reply(Place(channel, root, user["id"], user.get("team_id") or self.identity.team), incoming.message_id, LOOKING)
        try:
            final = await reply.run(self.platform.reply(incoming))
        except SlackApiError as error:
            if error.response.get("error") not in ("not_in_channel", "channel_not_found"):
                raise
            await respond(text="I can't post in this conversation: invite me to it first (/invite @IDEFICS).", response_type="ephemeral")
            return
        self.platform.record("command")
        log.info("slack.described", extra={"conversation": str(key), "answered": bool(final.text)})

    def _take_over(self, pending: Unanswered) -> None:
        self.platform.spawn(self._resume(pending), "resume")

    async def _resume(self, pending: Unanswered) -> None:
        """Answer, in its thread, a message that a stopped process left unanswered: in the messages it
        had begun for the answer (their handles are Slack's ts), if it got as far as posting them."""
        key, asker = pending.key, pending.turn.author.id if pending.turn.author else ""
        if pending.turn.id is None:  # the process stopped before storing the question: its placeholder goes
            if await self.platform.take_back(pending):
                thread = SlackThread(self.client, key.channel, key.thread or None)
                for message in pending.reply:
                    await thread.delete(message)
            return
        place = Place(key.channel, key.thread or None, asker, self.identity.team)
        # No placeholder and no status: of several processes that try, only the one that adopts the
        # question may touch the thread, and it learns that it did only once the engine's events begin.
        reply = self.replies.reply(place, pending.turn.message_id, THINKING, begun=pending.reply, taken_over=True)
        await self.platform.resume(pending, reply, shared=not key.channel.startswith("D"), message_ts=pending.turn.message_id)

    async def _route(self, event: dict, event_id: str) -> tuple[ConversationKey, str | None] | None:
        """The conversation a message belongs to and the thread to answer in, or None if the bot
        should stay out of it (not a message by a person allowed here, or not addressed to the bot)."""
        if event.get("subtype") not in _SAID:
            self.platform.record("ignored")
            return None
        channel, user = event.get("channel", ""), event.get("user", "")
        is_dm = event.get("channel_type") == "im"
        who = Requester(
            user_id=user,
            channel_id=channel,
            is_dm=is_dm,
            is_bot=bool(event.get("bot_id")),
            is_self=user == self.identity.user_id or (bool(self.identity.bot_id) and event.get("bot_id") == self.identity.bot_id),
        )
        reason = refusal_reason(self.settings, who)
        if reason is None:
            if is_dm and "thread_ts" in event:  # a chat of the assistant panel, or a thread of the DM
                return ConversationKey("slack", channel, event["thread_ts"]), event["thread_ts"]
            if is_dm:
                return ConversationKey("slack", channel), None
            root = event.get("thread_ts") or event["ts"]
            key = ConversationKey("slack", channel, root)
            mentioned = event.get("type") == "app_mention" or f"<@{self.identity.user_id}>" in event.get("text", "")
            root_message = f"{channel}/{root}"
            if mentioned:
                # The bot is in this thread from now on, before any turn is stored: follow-ups sent while
                # the first message is taken in, or after it was refused, are for the bot too.
                await self.platform.follow(key, root_message)
                return key, root
            if "thread_ts" in event and await self.platform.follows(key, root_message):
                return key, root
            reason = "not addressed to the bot"
        refused = reason not in SILENT and reason != "not addressed to the bot"  # a person the access rules keep out
        self.platform.record("refused" if refused else "ignored")
        log.debug("slack.ignored", extra={"event_id": event_id, "reason": reason})
        return None


def _author(event: dict) -> Author:
    """The speaker; the name comes from the profile Slack attaches to messages, else the user id."""
    profile = event.get("user_profile") or {}
    user = event.get("user", "")
    return Author(user, profile.get("display_name") or profile.get("real_name") or profile.get("name") or user)
