"""The Discord adapter: IDEFICS in servers and DMs, on discord.py.

Where a Discord message becomes an engine call, in order:
    `on_message`   skips its own and other bots' messages, then asks
    `_route`       whether the message is for the bot and which conversation it continues: a DM, a
                   thread the bot is in, a reply to one of its messages, or a new one opened by a mention;
    `_answer`      opens the thread if needed and hands the message to `Platform.answer`, which streams
                   `Engine.reply(...)` into Discord (a `ButtonedReply`: LiveReply on a `ChannelSurface`).
Deleting the question while it is answered cancels the request (`on_raw_message_delete`). Each
message is answered once, even if the gateway delivers it again. At start-up, the messages that a
killed process stored but never answered are answered where they were asked (`_resume`).
A reply carries a "Stop" button while it is written and a "Regenerate" button once it is the
conversation's latest answer (adapters/discord/buttons.py); both keep working after a restart.
Slash commands: adapters/discord/commands.py. Showing replies: adapters/discord/delivery.py.
With `[discord] shard_count`, the process runs the shards `shard_ids` of the bot (`_ShardedClient`);
its other shards run in other processes that share the state ([state] url).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
import yarl

from adapters.discord.buttons import BUTTON_TYPES
from adapters.discord.commands import BotCommands
from adapters.discord.delivery import NO_PINGS, ButtonedReply, ChannelSurface
from adapters.discord.input import PLATFORM, Channel, attachments_of, mentions_me, question_text, refusal, refusal_notice, thread_name
from adapters.discord.settings import DiscordSettings
from bot.sdk.platform import ConfigError, Platform
from bot.sdk.stopping import Replies, StopOutcome
from ground.conversation import Author, ConversationKey, Unanswered
from ground.messages import IncomingMessage

log = logging.getLogger("adapters.discord")  # the platform's logger (as its Platform.log)

PORTAL = "https://discord.com/developers/applications"
BAD_TOKEN = (
    f"[discord] token: Discord refused the token. Copy your bot's token from {PORTAL} → your application → Bot → Reset Token, "
    "and set DISCORD_TOKEN to it."
)
NO_MESSAGE_CONTENT = (
    "[discord]: Discord refused the Message Content intent, which the bot needs to read messages. Turn it on at "
    f"{PORTAL} → your application → Bot → Privileged Gateway Intents → MESSAGE CONTENT INTENT, save, and start the bot again."
)
SHARDING_REQUIRED = (
    "[discord]: Discord requires this bot, in many guilds, to split them over shards. Set [discord] shard_count "
    "(about one shard per 1,000 guilds), and shard_ids in each process if several share them."
)
CONNECT_TIMEOUT_S = 60.0
_STABLE_S = 60.0  # a connection that lasted this long was a good one: failures are counted afresh
_BACKOFF_MAX_S = 60.0
_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
# Where a stopped process's question can be answered later: the places the bot posts in by itself.
_Resumable = discord.TextChannel | discord.VoiceChannel | discord.StageChannel | discord.Thread | discord.DMChannel


def _intents() -> discord.Intents:
    intents = discord.Intents.none()
    intents.guilds = True  # channels, threads, roles
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True  # privileged: enabled in the developer portal
    return intents


@dataclass(frozen=True)
class _Route:
    """Which conversation a message continues, and how to answer it."""

    channel: Channel  # where the message was posted
    key: ConversationKey
    shared: bool = True  # several people talk here: speakers are named in the prompt
    open_thread: bool = False  # open a thread on the message and answer there
    reply: bool = False  # answer as a reply to the message


def _current_task() -> asyncio.Task:
    """The task running the caller (under asyncio a coroutine always runs in one)."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("called outside an asyncio task")
    return task


def _client_options() -> dict:
    # The bot has no voice: discord.py's warnings about missing voice libraries would only puzzle admins.
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
    return {"intents": _intents(), "allowed_mentions": NO_PINGS, "chunk_guilds_at_startup": False}


class _Handlers:
    """discord.py's event handlers, handing the events to the adapter (for either kind of client)."""

    adapter: DiscordAdapter

    async def setup_hook(self) -> None:
        self.adapter.client.add_dynamic_items(*BUTTON_TYPES)  # buttons on messages sent before a restart work too
        if self.adapter.publishes_commands:
            await self.adapter.commands.register()

    async def on_resumed(self) -> None:
        log.info("discord.resumed")

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_raw_message_delete(self, event: discord.RawMessageDeleteEvent) -> None:
        self.adapter.on_raw_message_delete(event)

    async def on_error(self, event: str, *args, **kwargs) -> None:
        log.exception("discord.event_failed", extra={"event": event})


class _Client(_Handlers, discord.Client):
    """One gateway connection for all the bot's guilds."""

    def __init__(self, adapter: DiscordAdapter):
        super().__init__(**_client_options())
        self.adapter = adapter

    async def on_connect(self) -> None:
        self.adapter.opened.set()


class _ShardedClient(_Handlers, discord.AutoShardedClient):
    """The shards `shard_ids` of the bot's `shard_count`, one gateway connection each. Discord sends
    each guild's events to shard (guild id >> 22) % shard_count, and DMs to shard 0."""

    def __init__(self, adapter: DiscordAdapter, shard_count: int, shard_ids: list[int]):
        super().__init__(shard_count=shard_count, shard_ids=shard_ids, **_client_options())
        self.adapter = adapter
        self._not_connected = set(shard_ids)

    async def on_shard_connect(self, shard_id: int) -> None:
        self._not_connected.discard(shard_id)
        if not self._not_connected:
            self.adapter.opened.set()


class _ProcessAddresses:
    """discord.py reads the REST root and the gateway address from class attributes, so they hold
    for the whole process. The first adapter that starts sets them, the last one that stops puts the
    previous ones back, and adapters in between (two bots in one process, as in tests) must agree."""

    def __init__(self) -> None:
        self._users = 0
        self._wanted: tuple[str | None, str | None] = (None, None)
        self._previous: tuple[str, yarl.URL] | None = None

    def use(self, api_base_url: str | None, gateway_url: str | None) -> None:
        if self._users and (api_base_url, gateway_url) != self._wanted:
            raise ConfigError(
                "[discord]: another Discord bot in this process uses other api_base_url/gateway_url addresses; "
                "discord.py keeps them process-wide, so run each in a process of its own."
            )
        if not self._users:
            self._previous = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
            self._wanted = (api_base_url, gateway_url)
            if api_base_url:
                discord.http.Route.BASE = api_base_url.rstrip("/")
            if gateway_url:
                discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if not self._users and self._previous is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._previous


_ADDRESSES = _ProcessAddresses()


class DiscordAdapter:
    """Connects one bot account to Discord and answers there."""

    name = PLATFORM
    Settings = DiscordSettings
    delivery_errors = (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError)

    @staticmethod
    def describe_error(error: BaseException) -> dict[str, object]:
        """A reply Discord wouldn't take, for the logs: its HTTP status and error code, or the error's type."""
        return {"status": error.status, "code": error.code} if isinstance(error, discord.HTTPException) else {"error": type(error).__name__}

    def __init__(self, platform: Platform, settings: DiscordSettings):
        if settings.token is None:  # the settings refuse an enabled adapter without one
            raise ConfigError("[discord] has no token: set token in [discord], or DISCORD_TOKEN.")
        self.settings = settings
        self.platform = platform
        self._token = settings.token.get_secret_value()
        # With sharding, this process runs `_shard_ids` of the bot's `settings.shard_count` shards.
        self._shard_ids = settings.shard_ids or list(range(settings.shard_count or 0))
        self.client = self._new_client()
        self.commands = BotCommands(self.client, platform, settings)
        self.opened = asyncio.Event()  # set when the gateway first opens: `start` waits for it
        self._gateway: asyncio.Task | None = None
        self._answering: dict[int, asyncio.Task] = {}  # question message id -> the task answering it
        self._deleted: set[int] = set()
        self._watching: asyncio.Task | None = None  # looks for questions that stopped processes left
        self._resumes: set[asyncio.Task] = set()
        self._uses_addresses = False
        self._stopping = False
        self.failed = asyncio.Event()  # set when the adapter gave up reconnecting; `failure` says why
        self.failure: str | None = None
        self.replies = Replies(settings.anyone_can_stop)

    @property
    def publishes_commands(self) -> bool:
        """Whether this process sends the commands to Discord: the one that runs shard 0 does."""
        return self.settings.shard_count is None or 0 in (self.settings.shard_ids or [0])

    async def sync_commands(self) -> list[str]:
        """`idefics-bot sync-commands`: publish the commands now, whether or not they changed (a REST
        login, no gateway connection); returns the scopes published."""
        _ADDRESSES.use(self.settings.api_base_url, self.settings.gateway_url)
        client = discord.Client(intents=discord.Intents.none())  # no handlers: its login only fetches the application
        try:
            if self.settings.token is None:
                raise ConfigError(BAD_TOKEN)
            await client.login(self.settings.token.get_secret_value())
            return await BotCommands(client, self.platform, self.settings).register(force=True)
        except discord.LoginFailure:
            raise ConfigError(BAD_TOKEN) from None
        finally:
            await client.close()
            _ADDRESSES.release()

    # -- connecting --------------------------------------------------------------------------

    def _new_client(self) -> _Client | _ShardedClient:
        shard_count = self.settings.shard_count
        return _Client(self) if shard_count is None else _ShardedClient(self, shard_count, self._shard_ids)

    async def start(self) -> None:
        settings = self.settings
        _ADDRESSES.use(settings.api_base_url, settings.gateway_url)  # every REST and gateway call goes there
        self._uses_addresses = True
        try:
            connection = await self._connect()
        except BaseException as error:
            await self.stop()
            failure = self._startup_error(error)
            if failure is None:
                raise
            raise failure from None
        self._gateway = asyncio.create_task(self._stay_connected(connection), name="discord-gateway")
        shards = {"shards": ",".join(map(str, self._shard_ids)), "shard_count": settings.shard_count} if settings.shard_count else {}
        user = self.client.user  # known since login
        log.info("discord.connected", extra={"user": user.id if user else None, "guilds": len(self.client.guilds), **shards})
        await self.replies.route(self.platform)  # Stop clicks that reach the process of another shard
        self._watching = asyncio.create_task(self.platform.watch_unanswered(self._take_over), name="discord-unanswered")

    async def _connect(self) -> asyncio.Task:
        """A new client, logged in, with its gateway connection open: returns the task running it."""
        if self.client.is_closed():  # a reconnect: discord.py's clients don't connect again once closed
            self.client = self._new_client()
            self.commands = BotCommands(self.client, self.platform, self.settings)
        self.opened = asyncio.Event()
        await self.client.login(self._token)
        connection = asyncio.create_task(self.client.connect(), name="discord-connection")
        waiting = asyncio.create_task(self.opened.wait())
        await asyncio.wait({connection, waiting}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not self.opened.is_set():
            if not connection.done():
                connection.cancel()
                raise TimeoutError("no answer from the gateway")
            raise connection.exception() or ConnectionError("the gateway closed the connection")
        return connection

    async def _stay_connected(self, connection: asyncio.Task) -> None:
        """Keep the gateway up. discord.py resumes the drops it expects by itself; a connection that
        ends in anything else (a payload it can't parse, say) leaves the client deaf, so a new client
        connects after a growing pause, and the log says so. After `reconnect_attempts` failures in a
        row (a connection that lasted a minute starts the count afresh), the adapter gives up:
        `failure` says why, /healthz reports it, and `run` stops with exit status 1."""
        loop = asyncio.get_running_loop()
        failures, since = 0, loop.time()
        while True:
            try:
                await connection
                return  # closed by `stop`
            except Exception as error:  # whatever ended it, the bot must not stay deaf
                if self._stopping:
                    return
                failures = failures + 1 if loop.time() - since < _STABLE_S else 1
                reason = NO_MESSAGE_CONTENT if isinstance(error, discord.PrivilegedIntentsRequired) else type(error).__name__
                log.error("discord.disconnected", extra={"reason": reason, "attempt": failures}, exc_info=error)
            while True:
                await self.client.close()
                if failures > self.settings.reconnect_attempts:
                    self.failure = f"the gateway connection failed {failures} times in a row; the last error was {reason}"
                    log.error("discord.gave_up", extra={"failures": failures})
                    self.failed.set()
                    return
                delay = min(_BACKOFF_MAX_S, self.settings.reconnect_backoff_s * 2 ** (failures - 1))
                log.warning("discord.reconnecting", extra={"attempt": failures, "in_s": delay})
                await asyncio.sleep(delay)
                try:
                    connection = await self._connect()
                except Exception as error:
                    failures, reason = failures + 1, type(error).__name__
                    log.warning("discord.reconnect_failed", extra={"attempt": failures - 1, "reason": reason})
                    continue
                since = loop.time()
                log.info("discord.reconnected", extra={"attempt": failures})
                break

    @property
    def connected(self) -> bool:
        """Whether the gateway connection is up now (every shard's, when sharded): for /healthz."""
        client = self.client
        if client.is_closed() or not self.opened.is_set() or self._gateway is None or self._gateway.done():
            return False
        if isinstance(client, discord.AutoShardedClient):
            return all(not shard.is_closed() for shard in client.shards.values())
        return client.ws is not None and client.ws.open

    def _startup_error(self, error: BaseException) -> ConfigError | None:
        """What to tell the person starting the bot, for the failures they can fix."""
        if isinstance(error, discord.LoginFailure) or (isinstance(error, discord.ConnectionClosed) and error.code == 4004):
            return ConfigError(BAD_TOKEN)
        if isinstance(error, discord.PrivilegedIntentsRequired):
            return ConfigError(NO_MESSAGE_CONTENT)
        if isinstance(error, discord.ConnectionClosed) and error.code == 4011:
            return ConfigError(SHARDING_REQUIRED)
        if isinstance(error, (OSError, aiohttp.ClientError, TimeoutError, discord.HTTPException, discord.ConnectionClosed)):
            where = self.settings.api_base_url or "discord.com"
            reason = str(error) or type(error).__name__
            return ConfigError(f"[discord]: couldn't connect to Discord ({where}): {reason}. Check the network, and api_base_url/gateway_url if set.")
        return None

    async def stop(self) -> None:
        self._stopping = True
        for task in [*self._answering.values(), *self._resumes, *([self._watching] if self._watching else [])]:
            task.cancel()
        await self.client.close()
        if self._gateway is not None:
            self._gateway.cancel()  # it may be pausing before a reconnect
            await asyncio.gather(self._gateway, return_exceptions=True)
        if self._uses_addresses:
            _ADDRESSES.release()
            self._uses_addresses = False

    # -- messages ----------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if me is None or message.type not in _ANSWERED_TYPES or message.author.id == me.id:
            return  # joins, pins, "thread created" notices; and its own messages
        record = self.platform.record
        channel = await self._channel_of(message)
        if channel is None:
            record("ignored")
            return
        reason = refusal(self.settings, message.author, channel, me)
        if reason is not None and refusal_notice(reason) is None:
            record("ignored")
            return  # another bot's message: ignored without a word, or a look-up
        route = await self._route(message, channel, me)
        if route is None:
            record("ignored")
            return
        if reason is not None:
            record("refused")
            log.info("discord.refused", extra={"reason": reason, "user": message.author.id, "channel": channel.id})
            if self.settings.refusal_notice:
                try:
                    await message.reply(refusal_notice(reason), allowed_mentions=NO_PINGS, mention_author=False)
                except discord.HTTPException as error:
                    log.warning("discord.reply_failed", extra={"status": error.status, "code": error.code, "channel": channel.id})
            return
        if await self.platform.first_delivery(str(message.id), message_id=message.id):  # not a gateway replay
            await self._answer(message, route, me)

    async def _channel_of(self, message: discord.Message) -> Channel | None:
        """The message's channel; a thread that fell out of discord.py's cache is fetched, to know its parent."""
        if message.guild is None or not isinstance(message.channel, discord.PartialMessageable):
            return message.channel
        try:
            fetched = await self.client.fetch_channel(message.channel.id)
        except discord.HTTPException as error:
            log.warning("discord.channel_unknown", extra={"status": error.status, "channel": message.channel.id})
            return None
        return fetched if isinstance(fetched, Channel) else None  # not a category: messages aren't posted there

    async def _route(self, message: discord.Message, channel: Channel, me: discord.ClientUser) -> _Route | None:
        """The conversation `message` continues, or None when it isn't for the bot."""
        if message.guild is None:
            return _Route(channel, ConversationKey(PLATFORM, str(channel.id)), shared=False)
        mentioned = mentions_me(message, me)
        if isinstance(channel, discord.Thread):  # also every forum and media post
            key = ConversationKey(PLATFORM, str(channel.parent_id), str(channel.id))
            if mentioned or channel.owner_id == me.id or await self.platform.follows(key):
                return _Route(channel, key)
            return None
        if message.reference is not None and message.reference.message_id is not None:
            replied = await self.platform.conversation_of(str(message.reference.message_id))
            if replied is not None:
                return _Route(channel, replied, reply=True)
        if not mentioned:
            return None
        # A new conversation, known by its first message (a thread opened on a message has its id).
        key = ConversationKey(PLATFORM, str(channel.id), str(message.id))
        if self.settings.reply_in_thread and isinstance(channel, discord.TextChannel):
            return _Route(channel, key, open_thread=True)
        return _Route(channel, key, reply=True)

    async def _answer(self, message: discord.Message, route: _Route, me: discord.ClientUser) -> None:
        text = question_text(message, me)
        files = attachments_of(message.attachments, self.platform.images)
        channel, key, reply_to = route.channel, route.key, message if route.reply else None
        self._answering[message.id] = _current_task()
        reply: ButtonedReply | None = None
        try:
            if route.open_thread:
                thread = await self._open_thread(message, thread_name(text, files))
                if thread is not None:
                    channel, key = thread, ConversationKey(PLATFORM, str(route.channel.id), str(thread.id))
                else:
                    reply_to = message
            author = Author(str(message.author.id), message.author.display_name)
            incoming = IncomingMessage(key, author, text, files, str(message.id), route.shared)
            reply = self._reply(channel, reply_to, key, message.id, message.author.id)
            # "Typing…" is shown alongside, not awaited first: the reply takes the message's place in
            # its conversation at once, so a later message of the thread can't go before it.
            typing = asyncio.create_task(self._typing(channel))
            try:
                await self.platform.answer(incoming, reply, message_id=message.id)
            finally:
                typing.cancel()
        except asyncio.CancelledError:
            if message.id in self._deleted and reply is not None:
                log.info("discord.question_deleted", extra={"message_id": message.id})
                await reply.discard()
            raise
        except self.delivery_errors as error:  # the thread couldn't be opened
            self.platform.lost(key, **self.describe_error(error))
        finally:
            self._answering.pop(message.id, None)
            self._deleted.discard(message.id)

    def _reply(
        self,
        channel: discord.abc.Messageable,
        reply_to: discord.Message | discord.PartialMessage | None,
        key: ConversationKey,
        reply: int,
        asker: int,
        begun: Sequence[Any] = (),
    ) -> ButtonedReply:
        """A reply in `channel` whose messages continue `key`, with its buttons (its Stop names `reply`);
        it goes on in `begun`, the messages a stopped process had posted for it."""
        return ButtonedReply(channel, reply_to, self._linker(key), self.replies, reply, asker, begun)

    # -- buttons -----------------------------------------------------------------------------

    async def stop_pressed(self, interaction: discord.Interaction, reply: int) -> None:
        """The Stop button of the reply `reply`: its asker (or anyone, if configured) stops it."""
        user = interaction.user
        outcome = await self.replies.stop(str(reply), str(user.id), user.display_name)
        self.platform.record(f"stop_{outcome}")
        log.info("discord.stop", extra={"outcome": str(outcome), "reply": reply})
        if outcome is StopOutcome.STOPPED:
            await interaction.response.defer()  # the reply shows that it stopped, and loses the button
        else:
            notice = "Only the person who asked can stop this answer." if outcome is StopOutcome.NOT_ALLOWED else "That answer is already finished."
            await interaction.response.send_message(notice, ephemeral=True, allowed_mentions=NO_PINGS)

    async def regenerate_pressed(self, interaction: discord.Interaction, turn_id: int, asker: int) -> None:
        """The Regenerate button of the stored answer `turn_id`: the question is answered again, and
        the new answer replaces that one in the conversation."""
        user, message = interaction.user, interaction.message
        key = await self.platform.conversation_of(str(message.id)) if message is not None else None
        if user.id != asker and not self.settings.anyone_can_regenerate:
            notice = "Only the person who asked can have this answer written again."
        elif key is None or await self.platform.latest_answer(key) != turn_id:
            notice = "Only the latest answer of a conversation can be written again."
        else:
            notice = None
        self.platform.record("regenerate" if notice is None else "regenerate_refused")
        channel = interaction.channel
        if notice is not None or key is None or not isinstance(channel, discord.abc.Messageable):
            await interaction.response.send_message(notice or "I can't write here.", ephemeral=True, allowed_mentions=NO_PINGS)
            return
        await interaction.response.edit_message(view=None)  # this answer is being replaced
        author = Author(str(user.id), user.display_name)
        events = self.platform.regenerate(key, turn_id, author, shared=not isinstance(channel, discord.DMChannel))
        final = await self.platform.show(self._reply(channel, None, key, interaction.id, asker), events, key, regenerated=turn_id)
        if final is not None:
            log.info("discord.regenerated", extra={"conversation": str(key), "answered": bool(final.text)})

    @staticmethod
    async def _typing(channel: Channel) -> None:
        """Show that the bot is typing in `channel` until cancelled; if Discord won't, the reply goes on."""
        try:
            async with channel.typing():
                await asyncio.Future()
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as error:
            log.warning("discord.typing_failed", extra={"channel": channel.id, "error": type(error).__name__})

    def _linker(self, key: ConversationKey):
        """What links each message the bot posts to `key`, so that replying to it continues the conversation."""

        async def link(posted: discord.Message) -> None:
            await self.platform.follow(key, str(posted.id))

        return link

    def _take_over(self, pending: Unanswered) -> None:
        task = asyncio.create_task(self._resume(pending), name="discord-resume")
        self._resumes.add(task)
        task.add_done_callback(self._resumes.discard)

    async def _resume(self, pending: Unanswered) -> None:
        key, question = pending.key, int(pending.turn.message_id or 0)
        self._answering[question] = _current_task()  # deleting the question cancels this too
        try:
            channel, reply_to = await self._place_of(key, question)
            if channel is None or not self._runs_shard_of(channel):
                reason = "channel gone" if channel is None else "another process's shard"
                log.info("discord.resume_skipped", extra={"conversation": str(key), "reason": reason})
                return
            # In the messages the stopped process had begun for the answer, if it got as far as posting them.
            begun = [channel.get_partial_message(int(message_id)) for message_id in pending.reply]
            if pending.turn.id is None:  # the process stopped before storing the question: its messages go
                if await self.platform.take_back(pending):
                    await ChannelSurface(channel, begun=begun).discard()
                return
            shared = not isinstance(channel, discord.DMChannel)
            asker = int(pending.turn.author.id) if pending.turn.author else 0
            await self.platform.resume(pending, self._reply(channel, reply_to, key, question, asker, begun), shared, message_id=question)
        except self.delivery_errors as error:  # the place couldn't be looked up
            self.platform.lost(key, **self.describe_error(error))
        finally:
            self._answering.pop(question, None)
            self._deleted.discard(question)

    def _runs_shard_of(self, channel: Channel) -> bool:
        """Whether this process runs the shard that `channel` is on (always, unsharded): the process
        of that shard answers there. Guilds go to shard (guild id >> 22) % shard_count, DMs to 0."""
        count = self.settings.shard_count
        if count is None:
            return True
        guild = getattr(channel, "guild", None)
        return ((guild.id >> 22) % count if guild else 0) in self._shard_ids

    async def _place_of(self, key: ConversationKey, question: int) -> tuple[_Resumable | None, discord.PartialMessage | None]:
        """Where a conversation's answers go: its thread, or else its channel (a DM, or a channel where
        the bot answers inline, as a reply to the question)."""
        for channel_id in filter(None, (key.thread, key.channel)):
            try:
                channel = self.client.get_channel(int(channel_id)) or await self.client.fetch_channel(int(channel_id))
            except (discord.NotFound, discord.Forbidden):
                continue  # gone, or no longer ours; an inline conversation's "thread" is its first message
            if isinstance(channel, discord.Thread | discord.DMChannel):
                return channel, None
            if isinstance(channel, discord.TextChannel | discord.VoiceChannel | discord.StageChannel):
                return channel, channel.get_partial_message(question)
            # else a forum whose post is gone, or a category
        return None, None

    async def _open_thread(self, message: discord.Message, name: str) -> discord.Thread | None:
        """A thread on `message`, or None (answer inline then) if the bot may not open one there."""
        try:
            return await message.create_thread(name=name, auto_archive_duration=1440)
        except discord.HTTPException as error:
            log.warning("discord.thread_not_opened", extra={"status": error.status, "code": error.code, "channel": message.channel.id})
            return None

    def on_raw_message_delete(self, event: discord.RawMessageDeleteEvent) -> None:
        task = self._answering.get(event.message_id)
        if task is not None:
            self._deleted.add(event.message_id)
            task.cancel()
