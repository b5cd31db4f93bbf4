"""The Discord adapter: IDEFICS in servers and DMs, on discord.py.

Where a Discord message becomes an engine call, in order:
    `on_message`   skips its own and other bots' messages, then asks
    `_route`       whether the message is for the bot and which conversation it continues: a DM, a
                   thread the bot is in, a reply to one of its messages, or a new one opened by a mention;
    `_answer`      opens the thread if needed and streams `engine.reply(...)` into Discord.
Deleting the question while it is answered cancels the request (`on_raw_message_delete`).
Slash commands: adapters/discord_commands.py. Showing replies: adapters/discord_delivery.py.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
import discord
import yarl

from adapters.discord_commands import BotCommands
from adapters.discord_delivery import NO_PINGS, ChannelSurface, live_reply
from adapters.discord_input import PLATFORM, attachments_of, mentions_me, question_text, refusal_notice, requester, thread_name
from bot.access import refusal_reason
from bot.config import Config, ConfigError
from bot.conversation import Author, ConversationKey
from bot.engine import Engine, IncomingMessage

log = logging.getLogger(__name__)

PORTAL = "https://discord.com/developers/applications"
BAD_TOKEN = f"[discord] token: Discord refused the token. Copy your bot's token from {PORTAL} → your application → Bot → Reset Token, and set DISCORD_TOKEN to it."
NO_MESSAGE_CONTENT = (
    "[discord]: Discord refused the Message Content intent, which the bot needs to read messages. Turn it on at "
    f"{PORTAL} → your application → Bot → Privileged Gateway Intents → MESSAGE CONTENT INTENT, save, and start the bot again."
)
CONNECT_TIMEOUT_S = 60.0
_ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


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

    channel: discord.abc.Messageable  # where the message was posted
    key: ConversationKey
    shared: bool = True  # several people talk here: speakers are named in the prompt
    open_thread: bool = False  # open a thread on the message and answer there
    reply: bool = False  # answer as a reply to the message


class _Client(discord.Client):
    """discord.py's client, handing its events to the adapter."""

    def __init__(self, adapter: DiscordAdapter):
        # The bot has no voice: discord.py's warnings about missing voice libraries would only puzzle admins.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        super().__init__(intents=_intents(), allowed_mentions=NO_PINGS, chunk_guilds_at_startup=False)
        self.adapter = adapter

    async def setup_hook(self) -> None:
        await self.adapter.commands.register()

    async def on_connect(self) -> None:
        self.adapter.connected.set()

    async def on_resumed(self) -> None:
        log.info("discord.resumed")

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_raw_message_delete(self, event: discord.RawMessageDeleteEvent) -> None:
        self.adapter.on_raw_message_delete(event)

    async def on_error(self, event: str, *args, **kwargs) -> None:
        log.exception("discord.event_failed", extra={"event": event})


class DiscordAdapter:
    """Connects one bot account to Discord and answers there."""

    name = "discord"

    def __init__(self, config: Config, engine: Engine):
        self.settings = config.discord
        self.engine = engine
        self.client: _Client | None = None
        self.commands: BotCommands | None = None
        self.connected = asyncio.Event()
        self._gateway: asyncio.Task | None = None
        self._answering: dict[int, asyncio.Task] = {}  # question message id -> the task answering it
        self._deleted: set[int] = set()
        self._addresses: tuple[str, yarl.URL] | None = None

    # -- connecting --------------------------------------------------------------------------

    async def start(self) -> None:
        self._use_addresses()
        self.client = _Client(self)
        self.commands = BotCommands(self.client, self.engine, self.settings)
        try:
            await self.client.login(self.settings.token.get_secret_value())
            self._gateway = asyncio.create_task(self.client.connect(), name="discord-gateway")
            waiting = asyncio.create_task(self.connected.wait())
            await asyncio.wait({self._gateway, waiting}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if not self.connected.is_set():
                if not self._gateway.done():
                    raise TimeoutError("no answer from the gateway")
                raise self._gateway.exception() or ConnectionError("the gateway closed the connection")
        except BaseException as error:
            await self.stop()
            failure = self._startup_error(error)
            if failure is None:
                raise
            raise failure from None
        self._gateway.add_done_callback(self._gateway_ended)
        log.info("discord.connected", extra={"user": self.client.user.id, "guilds": len(self.client.guilds)})

    def _startup_error(self, error: BaseException) -> ConfigError | None:
        """What to tell the person starting the bot, for the failures they can fix."""
        if isinstance(error, discord.LoginFailure) or (isinstance(error, discord.ConnectionClosed) and error.code == 4004):
            return ConfigError(BAD_TOKEN)
        if isinstance(error, discord.PrivilegedIntentsRequired):
            return ConfigError(NO_MESSAGE_CONTENT)
        if isinstance(error, (OSError, aiohttp.ClientError, TimeoutError, discord.HTTPException, discord.ConnectionClosed)):
            where = self.settings.api_base_url or "discord.com"
            reason = str(error) or type(error).__name__
            return ConfigError(f"[discord]: couldn't connect to Discord ({where}): {reason}. Check the network, and api_base_url/gateway_url if set.")
        return None

    def _use_addresses(self) -> None:
        """Point discord.py at a Discord-compatible server, if configured. discord.py reads both addresses
        from class attributes (every REST, webhook and interaction call builds its URL from Route.BASE),
        so they hold for the whole process: set here, put back in `stop`."""
        self._addresses = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        if self.settings.api_base_url:
            discord.http.Route.BASE = self.settings.api_base_url.rstrip("/")
        if self.settings.gateway_url:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.settings.gateway_url)

    def _gateway_ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            reason = NO_MESSAGE_CONTENT if isinstance(error, discord.PrivilegedIntentsRequired) else type(error).__name__
            log.error("discord.disconnected", extra={"reason": reason})

    async def stop(self) -> None:
        for task in list(self._answering.values()):
            task.cancel()
        if self.client is not None:
            await self.client.close()
        if self._gateway is not None:
            await asyncio.gather(self._gateway, return_exceptions=True)
        if self._addresses is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._addresses
            self._addresses = None

    # -- messages ----------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if message.type not in _ANSWERED_TYPES or message.author.id == me.id:
            return  # joins, pins, "thread created" notices; and its own messages
        channel = await self._channel_of(message)
        if channel is None:
            return
        reason = refusal_reason(self.settings, requester(message.author, channel, me))
        if reason is not None and refusal_notice(reason) is None:
            return  # another bot's message: ignored without a word, or a look-up
        route = await self._route(message, channel, me)
        if route is None:
            return
        if reason is not None:
            log.info("discord.refused", extra={"reason": reason, "user": message.author.id, "channel": channel.id})
            if self.settings.refusal_notice:
                try:
                    await message.reply(refusal_notice(reason), allowed_mentions=NO_PINGS, mention_author=False)
                except discord.HTTPException as error:
                    log.warning("discord.reply_failed", extra={"status": error.status, "code": error.code, "channel": channel.id})
            return
        await self._answer(message, route, me)

    async def _channel_of(self, message: discord.Message) -> discord.abc.Messageable | None:
        """The message's channel; a thread that fell out of discord.py's cache is fetched, to know its parent."""
        if message.guild is None or not isinstance(message.channel, discord.PartialMessageable):
            return message.channel
        try:
            return await self.client.fetch_channel(message.channel.id)
        except discord.HTTPException as error:
            log.warning("discord.channel_unknown", extra={"status": error.status, "channel": message.channel.id})
            return None

    async def _route(self, message: discord.Message, channel: discord.abc.Messageable, me: discord.ClientUser) -> _Route | None:
        """The conversation `message` continues, or None when it isn't for the bot."""
        if message.guild is None:
            return _Route(channel, ConversationKey(PLATFORM, str(channel.id)), shared=False)
        mentioned = mentions_me(message, me)
        if isinstance(channel, discord.Thread):  # also every forum and media post
            key = ConversationKey(PLATFORM, str(channel.parent_id), str(channel.id))
            if mentioned or channel.owner_id == me.id or await self.engine.store.has_conversation(key):
                return _Route(channel, key)
            return None
        if message.reference is not None and message.reference.message_id is not None:
            key = await self.engine.store.conversation_of(PLATFORM, str(message.reference.message_id))
            if key is not None:
                return _Route(channel, key, reply=True)
        if not mentioned:
            return None
        # A new conversation, known by its first message (a thread opened on a message has its id).
        key = ConversationKey(PLATFORM, str(channel.id), str(message.id))
        if self.settings.reply_in_thread and isinstance(channel, discord.TextChannel):
            return _Route(channel, key, open_thread=True)
        return _Route(channel, key, reply=True)

    async def _answer(self, message: discord.Message, route: _Route, me: discord.ClientUser) -> None:
        text = question_text(message, me)
        files = attachments_of(message.attachments)
        channel, key, reply_to = route.channel, route.key, message if route.reply else None
        self._answering[message.id] = asyncio.current_task()
        surface: ChannelSurface | None = None
        try:
            if route.open_thread:
                thread = await self._open_thread(message, thread_name(text, files))
                if thread is not None:
                    channel, key = thread, ConversationKey(PLATFORM, str(route.channel.id), str(thread.id))
                else:
                    reply_to = message
            author = Author(str(message.author.id), message.author.display_name)
            incoming = IncomingMessage(key, author, text, files, str(message.id), route.shared)

            async def link(posted: discord.Message) -> None:
                await self.engine.store.link_message(PLATFORM, str(posted.id), key)

            surface = ChannelSurface(channel, reply_to, on_post=link)
            async with channel.typing():
                await live_reply(surface).run(self.engine.reply(incoming))
        except asyncio.CancelledError:
            if message.id in self._deleted and surface is not None:
                log.info("discord.question_deleted", extra={"message": message.id})
                await surface.discard()
            raise
        except discord.HTTPException as error:
            log.warning("discord.reply_failed", extra={"status": error.status, "code": error.code, "channel": channel.id})
        finally:
            self._answering.pop(message.id, None)
            self._deleted.discard(message.id)

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
