"""A fake Discord on 127.0.0.1: the gateway (a websocket) and the REST API v10, for a real discord.Client.

The client reaches it through `[discord] api_base_url` and `gateway_url`. The fake keeps a small world
(one guild with two text channels, a forum and a role; the people tests make; DMs, threads and
messages), records every REST call, answers 404 to routes it does not know and remembers them so
the test fails, and lets a test act as the people: post and delete messages, run slash commands and
context-menu commands, press the buttons on the bot's messages, or ask the gateway connection to
reconnect. Threads survive a restart of the bot (they come back in GUILD_CREATE), as on Discord. A sharded bot's connections each get the events
of their shard's guilds (guild id >> 22) % shard_count, and DMs go to shard 0, as on Discord; more
guilds can be added for that (`add_guild`).

Message components are checked as Discord checks them (action rows of buttons, custom_ids unique and
at most 100 characters) and only the bot's own messages can be edited, so only they carry its buttons.
A person can run the bot's commands where the bot is not a member when the app is installed to their
account (`foreign_channel`, `group_dm`): then only commands registered globally for user installs
(`integration_types` 1) in that context are offered, and the bot can answer only through the
interaction (posting in such a channel is refused with Missing Access), in at most 5 follow-ups. Command registrations are kept
with their `integration_types` and `contexts`, and each bulk overwrite is counted (`command_syncs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.loopback import serve, stream_oversized

INTENT_MESSAGE_CONTENT = 1 << 15
DISCORD_EPOCH_MS = 1420070400000
TIMESTAMP = "2025-01-01T00:00:00+00:00"
GUILD_INSTALL, USER_INSTALL = 0, 1  # integration types
IN_GUILD, IN_BOT_DM, IN_PRIVATE_CHANNEL = 0, 1, 2  # interaction contexts
# "Apps are limited to 5 followup messages per interaction if it was initiated from a user-installed app
# and isn't installed in the server" (authorizing integration owners: USER_INSTALL only); error 40094.
MAX_USER_INSTALL_FOLLOWUPS = 5
BUTTON_STYLES = {1, 2, 3, 4}  # primary, secondary, success, danger (5, link, has a url and no custom_id)


def snowflake_at(seconds: float, counter: int) -> int:
    """A Discord id created at `seconds` (Unix time)."""
    return (int(seconds * 1000) - DISCORD_EPOCH_MS) << 22 | (counter & 0xFFF)


@dataclass
class Call:
    """One REST request the bot made."""

    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class Interaction:
    """A slash or context-menu command a person ran, and what the bot showed for it."""

    id: str
    token: str
    channel_id: str
    responses: list[dict] = field(default_factory=list)  # interaction callbacks (defer, message)
    original: str | None = None  # the original response's content after the last edit
    type: int = 2  # 2: a command; 3: a button press (MESSAGE_COMPONENT)
    message_id: str | None = None  # a button press: the message the button is on (its "original response")
    user_installed_only: bool = False  # its authorizing integration owners are the person's account alone
    followups: list[dict] = field(default_factory=list)  # the follow-up messages sent for it


@dataclass
class _Session:
    """One gateway session: shard `shard` = (id, count) of the bot; (0, 1) when it doesn't shard."""

    id: str
    shard: tuple[int, int]
    ws: web.WebSocketResponse | None
    sent: list[dict] = field(default_factory=list)  # its dispatches, for replay on RESUME

    def serves(self, guild_id: str | None) -> bool:
        shard_id, count = self.shard
        return shard_id == 0 if guild_id is None else (int(guild_id) >> 22) % count == shard_id


@dataclass
class RestFailure:
    """An error answer to coming REST calls `method` `path` (e.g. "POST", "/channels/123/messages"; `*`
    matches anything, as in "/channels/123/messages/*"). With `after`, the call takes effect before
    the error (the message was created, then 500), as can happen on Discord. `lasting` ones never run
    out; the others answer one call."""

    method: str
    path: str
    status: int
    code: int = 0
    message: str = "500: Internal Server Error"
    retry_after: float = 0.2  # for 429
    after: bool = False
    lasting: bool = False
    body: Any = None  # the answer's JSON instead of {"message", "code"} (field errors; a 200 nobody can parse)


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses JSON only when the Content-Type is exactly application/json.
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def _invalid(field_name: str, why: str) -> web.Response:
    return _json({"message": "Invalid Form Body", "code": 50035, "errors": {field_name: why}}, 400)


def components_problem(components: Any) -> str | None:
    """Why Discord would refuse these message components (action rows of buttons), or None."""
    if not isinstance(components, list) or len(components) > 5:
        return "at most 5 action rows"
    custom_ids: set[str] = set()
    for row in components:
        if row.get("type") != 1 or not 0 < len(row.get("components", [])) <= 5:
            return "each row is an action row of 1 to 5 components"
        for button in row["components"]:
            if button.get("type") != 2:
                return "only buttons are expected here"
            if button.get("style") == 5:
                if not button.get("url") or "custom_id" in button:
                    return "a link button has a url and no custom_id"
                continue
            custom_id = button.get("custom_id")
            if button.get("style") not in BUTTON_STYLES or not isinstance(custom_id, str) or not 0 < len(custom_id) <= 100:
                return "a button has a style and a custom_id of 1 to 100 characters"
            if custom_id in custom_ids:
                return "custom_ids must be unique within a message"
            if len(button.get("label") or "") > 80:
                return "a button label has at most 80 characters"
            custom_ids.add(custom_id)
    return None


def command_problem(command: dict) -> str | None:
    """Why Discord would refuse this application command in a bulk overwrite, or None."""
    name, kind = command.get("name", ""), command.get("type", 1)
    if not 0 < len(name) <= 32 or (kind == 1 and (name != name.lower() or not all(c.isalnum() or c in "-_" for c in name))):
        return f"bad name {name!r}"
    if kind == 1 and not 0 < len(command.get("description", "")) <= 100:
        return f"{name}: a slash command needs a description of 1 to 100 characters"
    if not set(command.get("integration_types") or [GUILD_INSTALL]) <= {GUILD_INSTALL, USER_INSTALL}:
        return f"{name}: unknown integration type"
    if not set(command.get("contexts") or []) <= {IN_GUILD, IN_BOT_DM, IN_PRIVATE_CHANNEL}:
        return f"{name}: unknown context"
    return None


class FakeDiscord:
    """The fake; `async with FakeDiscord() as discord:` runs it."""

    def __init__(self, *, token: str = "fake-bot-token", message_content_enabled: bool = True, shards_required: int = 1):
        """`shards_required`: the fewest shards Discord lets this bot connect with (4011 below it)."""
        self.token = token
        self.message_content_enabled = message_content_enabled
        self.shards_required = shards_required
        self._ids = itertools.count(1)
        self.bot = self.user("IDEFICS", bot=True)
        self.application_id = self.new_id()
        self.guild_id = self.new_id()
        self.guild_names = {self.guild_id: "Test guild"}
        self.role = {
            "id": self.new_id(),
            "name": "members",
            "permissions": "0",
            "position": 1,
            "color": 0,
            "hoist": False,
            "managed": False,
            "mentionable": True,
            "flags": 0,
        }
        self.bot_role = {**self.role, "id": self.new_id(), "name": "IDEFICS", "managed": True, "tags": {"bot_id": self.bot["id"]}}
        self.channels: dict[str, dict] = {}
        self.text_channel = self._channel("general", 0)
        self.other_channel = self._channel("off-topic", 0)
        self.forum = self._channel("questions", 15)
        self.messages: dict[str, dict] = {}
        self.attachment_files: dict[str, tuple[bytes, str]] = {}
        self.oversized: dict[str, int] = {}
        self.cdn_sent: dict[str, int] = {}
        self.interactions: dict[str, Interaction] = {}
        self.commands: dict[str, list[dict]] = {}  # "global" or a guild id -> registered commands
        self.command_syncs: list[str] = []  # the scope ("global" or a guild id) of each bulk overwrite
        self.foreign_guilds: dict[str, str] = {}  # guilds the bot is not in (id -> name), for user installs
        self.calls: list[Call] = []
        self.unknown: list[str] = []
        self.sessions: list[str] = []  # "identify" or "resume", in order
        self.unparseable_on_identify = False  # send `send_unparseable()` to every new session
        self.identified_shards: list[list[int] | None] = []  # the `shard` of each IDENTIFY
        self.no_threads_in: set[str] = set()  # channels where the bot lacks Create Public Threads
        self.rest_failures: list[RestFailure] = []
        self.failed: list[Call] = []  # the calls answered with a `RestFailure`
        self.gateway_open = True  # False: new gateway connections are refused (503), as in an outage
        self.refused_connections = 0
        self.replay_overlap = 0  # a RESUME also replays this many events the bot had already received
        self._changed = asyncio.Condition()
        self._sessions: list[_Session] = []  # the latest of each shard
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- running -----------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/cdn/attachments/{id}/{name}", self._cdn)
        routes = [
            ("GET", "/users/@me", self._me),
            ("GET", "/oauth2/applications/@me", self._application),
            ("GET", "/applications/{app}/commands", self._get_commands),
            ("GET", "/applications/{app}/guilds/{guild}/commands", self._get_commands),
            ("PUT", "/applications/{app}/commands", self._put_commands),
            ("PUT", "/applications/{app}/guilds/{guild}/commands", self._put_commands),
            ("GET", "/channels/{channel}", self._get_channel),
            ("POST", "/channels/{channel}/typing", self._typing),
            ("POST", "/channels/{channel}/messages", self._post_message),
            ("PATCH", "/channels/{channel}/messages/{message}", self._edit_message),
            ("DELETE", "/channels/{channel}/messages/{message}", self._delete_message),
            ("POST", "/channels/{channel}/messages/{message}/threads", self._create_thread),
            ("POST", "/interactions/{interaction}/{token}/callback", self._callback),
            ("POST", "/webhooks/{app}/{token}", self._followup),
            ("PATCH", "/webhooks/{app}/{token}/messages/{message}", self._edit_webhook_message),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, "/api/v10" + path, self._recorded(handler))
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        self._runner, self.port = await serve(app)
        return self

    async def __aexit__(self, *exc_info) -> None:
        for session in self._sessions:
            if session.ws is not None:
                await session.ws.close()
        await self._runner.cleanup()

    @property
    def api_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Wait until `predicate()` is truthy (checked whenever the fake's state changes) and return it."""
        async with self._changed:
            async with asyncio.timeout(timeout):
                return await self._changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- the world ---------------------------------------------------------------------------

    def new_id(self, at: float | None = None) -> str:
        return str(snowflake_at(time.time() if at is None else at, next(self._ids)))

    def user(self, name: str, *, bot: bool = False) -> dict:
        return {"id": self.new_id(), "username": name.lower(), "global_name": name, "discriminator": "0", "avatar": None, "bot": bot}

    def add_guild(self, name: str, shard: tuple[int, int] = (0, 1)) -> dict:
        """Another guild the bot is in, whose events go to shard `shard` = (id, count); returns its text channel."""
        shard_id, count = shard
        milliseconds = int(time.time() * 1000) - DISCORD_EPOCH_MS
        milliseconds += (shard_id - milliseconds) % count  # the guild id's time picks its shard
        guild_id = str(milliseconds << 22 | next(self._ids) & 0xFFF)
        self.guild_names[guild_id] = name
        return self._channel("general", 0, guild_id)

    def _channel(self, name: str, kind: int, guild_id: str | None = None) -> dict:
        channel = {
            "id": self.new_id(),
            "type": kind,
            "guild_id": guild_id or self.guild_id,
            "name": name,
            "position": len(self.channels),
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        }
        if kind == 15:
            channel.update(available_tags=[], default_reaction_emoji=None, flags=0)
        self.channels[channel["id"]] = channel
        return channel

    def foreign_channel(self, name: str = "elsewhere") -> dict:
        """A text channel of a guild the bot is not in (someone may have the app installed to their account)."""
        guild_id = self.new_id()
        self.foreign_guilds[guild_id] = f"{name}'s guild"
        return self._channel(name, 0, guild_id)

    def group_dm(self, *people: dict) -> dict:
        """A group DM among `people`, without the bot."""
        channel = {"id": self.new_id(), "type": 3, "recipients": list(people), "last_message_id": None, "name": None, "owner_id": people[0]["id"]}
        self.channels[channel["id"]] = channel
        return channel

    def bot_can_post_in(self, channel: dict) -> bool:
        """Whether the bot is in this channel: a channel of one of its guilds (or a thread there), or its DMs."""
        if channel["type"] == 1:
            return True
        return channel["type"] != 3 and channel.get("guild_id") in self.guild_names

    def threads(self) -> list[dict]:
        return [channel for channel in self.channels.values() if channel["type"] in (10, 11, 12)]

    def _thread(self, parent: dict, name: str, owner_id: str, thread_id: str | None = None) -> dict:
        thread = {
            "id": thread_id or self.new_id(),
            "type": 11,
            "guild_id": parent["guild_id"],
            "parent_id": parent["id"],
            "owner_id": owner_id,
            "name": name,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": 0,
            "member_count": 1,
            "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": TIMESTAMP, "locked": False},
            "flags": 0,
        }
        self.channels[thread["id"]] = thread
        return thread

    def dm_channel(self, person: dict) -> dict:
        """The DM channel between `person` and the bot."""
        for channel in self.channels.values():
            if channel["type"] == 1 and channel["recipients"][0]["id"] == person["id"]:
                return channel
        channel = {"id": self.new_id(), "type": 1, "recipients": [person], "last_message_id": None}
        self.channels[channel["id"]] = channel
        return channel

    def _member(self, person: dict, roles: list[str]) -> dict:
        return {"roles": roles, "joined_at": TIMESTAMP, "deaf": False, "mute": False, "flags": 0, "nick": None, "avatar": None, "pending": False}

    def guild(self, guild_id: str | None = None) -> dict:
        """A guild's GUILD_CREATE (by default the first guild's)."""
        guild_id = guild_id or self.guild_id
        return {
            "id": guild_id,
            "name": self.guild_names[guild_id],
            "unavailable": False,
            "owner_id": self.bot["id"],
            "member_count": 3,
            "roles": [
                {**self.role, "id": guild_id, "name": "@everyone", "position": 0, "mentionable": False},
                self.role,
                self.bot_role,
            ],
            "channels": [c for c in self.channels.values() if c["type"] in (0, 15) and c["guild_id"] == guild_id],
            "threads": [thread for thread in self.threads() if thread["guild_id"] == guild_id],
            "members": [{**self._member(self.bot, [self.bot_role["id"]]), "user": self.bot}],
            "emojis": [],
            "stickers": [],
            "features": [],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "joined_at": TIMESTAMP,
        }

    def upload(self, name: str, data: bytes, content_type: str | None, *, served_bytes: int | None = None) -> dict:
        """An attachment as it appears in a message, served by the fake's CDN route. With
        `served_bytes`, the CDN sends that many bytes (`data`, then zeros, without a Content-Length)
        while the message says the file has len(data): a file larger than it claims.
        `cdn_sent[id]` counts the bytes the CDN got to send before the client stopped reading."""
        attachment_id = self.new_id()
        self.attachment_files[attachment_id] = (data, content_type or "application/octet-stream")
        if served_bytes is not None:
            self.oversized[attachment_id] = served_bytes
        url = f"http://127.0.0.1:{self.port}/cdn/attachments/{attachment_id}/{name}"
        attachment = {"id": attachment_id, "filename": name, "size": len(data), "url": url, "proxy_url": url}
        if content_type:
            attachment["content_type"] = content_type
        return attachment

    def _message(self, channel_id: str, author: dict, content: str, keep: bool = True, **extra: Any) -> dict:
        channel = self.channels[channel_id]
        message = {
            "id": self.new_id(),
            "channel_id": channel_id,
            "author": author,
            "content": content,
            "timestamp": TIMESTAMP,
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
            **extra,
        }
        if channel["type"] not in (1, 3):
            message["guild_id"] = channel["guild_id"]
        if keep:
            self.messages[message["id"]] = message
            channel["last_message_id"] = message["id"]
        return message

    def bot_messages(self, channel_id: str) -> list[dict]:
        """What the bot has posted in a channel (as last edited), oldest first."""
        return [m for m in self.messages.values() if m["channel_id"] == channel_id and m["author"]["id"] == self.bot["id"]]

    def bot_texts(self, channel_id: str) -> list[str]:
        return [m["content"] for m in self.bot_messages(channel_id)]

    def writes(self) -> list[Call]:
        """Every REST call that posted or edited a message."""
        return [call for call in self.calls if call.method in ("POST", "PATCH") and isinstance(call.body, dict) and "content" in call.body]

    # -- people act --------------------------------------------------------------------------

    async def say(
        self,
        author: dict,
        channel: dict,
        content: str = "",
        *,
        mention: bool = False,
        attachments: tuple[dict, ...] = (),
        reply_to: dict | None = None,
        roles: tuple[str, ...] = (),
    ) -> dict:
        """`author` posts a message (mentioning the bot first if `mention`); dispatches MESSAGE_CREATE."""
        if mention:
            content = f"<@{self.bot['id']}> {content}".strip()
        mentions = [self.bot] if mention or (reply_to is not None and reply_to["author"]["id"] == self.bot["id"]) else []
        extra: dict[str, Any] = {"mentions": mentions, "attachments": list(attachments)}
        if reply_to is not None:
            extra.update(
                type=19,
                message_reference={"type": 0, "message_id": reply_to["id"], "channel_id": channel["id"], "guild_id": channel.get("guild_id")},
                referenced_message=reply_to,
            )
        if channel["type"] != 1:
            extra["member"] = self._member(author, list(roles))
        message = self._message(channel["id"], author, content, **extra)
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    def unseen_message(self, author: dict, channel: dict, content: str = "", *, attachments: tuple[dict, ...] = ()) -> dict:
        """A message in a channel the bot is not in (no event reaches it), for a user-installed command to target."""
        assert not self.bot_can_post_in(channel), "the bot would see this message: use say()"
        return self._message(channel["id"], author, content, attachments=list(attachments))

    async def delete(self, message: dict) -> None:
        del self.messages[message["id"]]
        payload = {"id": message["id"], "channel_id": message["channel_id"]}
        if "guild_id" in message:
            payload["guild_id"] = message["guild_id"]
        await self.dispatch("MESSAGE_DELETE", payload)

    async def start_forum_post(self, author: dict, title: str, content: str, **say: Any) -> tuple[dict, dict]:
        """`author` opens a forum post (a thread whose first message has the thread's id)."""
        thread = self._thread(self.forum, title, author["id"])
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return thread, await self.say(author, thread, content, **say)

    async def run_command(
        self,
        person: dict,
        channel: dict,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        attachments: dict[str, dict] | None = None,
        target: dict | None = None,
        roles: tuple[str, ...] = (),
        created_at: float | None = None,
    ) -> Interaction:
        """`person` runs slash command `name` (or, with `target`, the message command `name` on it).
        Where the bot is not a member (`foreign_channel`, `group_dm`), the app runs as installed to
        the person's account: only a global command made for user installs in that context is there."""
        context, user_installed = self._context_of(channel)
        if user_installed:
            command = next((c for c in self.commands.get("global", []) if c["name"] == name), None)
            assert command is not None, f"Discord offers no {name!r} here: only global commands are available where the bot is not a member"
            assert USER_INSTALL in (command.get("integration_types") or [GUILD_INSTALL]), f"{name!r} is not available to user installs"
            assert context in (command.get("contexts") or [IN_GUILD, IN_BOT_DM, IN_PRIVATE_CHANNEL]), f"{name!r} is not available in context {context}"
        else:
            command = next(c for c in self.commands.get(self.guild_id, []) + self.commands.get("global", []) if c["name"] == name)
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": command["type"]}
        resolved: dict[str, Any] = {}
        if target is not None:
            data["target_id"] = target["id"]
            resolved["messages"] = {target["id"]: target}
        else:
            data["options"] = [
                {"name": key, "type": next(o["type"] for o in command["options"] if o["name"] == key), "value": value}
                for key, value in (options or {}).items()
            ]
        if attachments:
            resolved["attachments"] = attachments
        if resolved:
            data["resolved"] = resolved
        interaction = Interaction(self.new_id(created_at), "", channel["id"])
        await self._interact(interaction, person, channel, data, roles)
        return interaction

    async def press(self, person: dict, message: dict, custom_id: str, *, roles: tuple[str, ...] = ()) -> Interaction:
        """`person` presses the button `custom_id` on `message`. Discord shows only the buttons a
        message has now, and only the bot's messages have the bot's buttons: anything else fails the test."""
        assert message["author"]["id"] == self.bot["id"], "only the bot's messages carry its buttons"
        current = self.messages.get(message["id"], message)
        buttons = {b.get("custom_id"): b for row in current.get("components", []) for b in row["components"]}
        assert custom_id in buttons, f"that message has no button {custom_id!r}; it has {sorted(filter(None, buttons))}"
        assert not buttons[custom_id].get("disabled"), f"the button {custom_id!r} is disabled"
        channel = self.channels[current["channel_id"]]
        interaction = Interaction(self.new_id(), "", channel["id"], type=3, message_id=current["id"])
        await self._interact(interaction, person, channel, {"custom_id": custom_id, "component_type": 2}, roles, message=current)
        return interaction

    def _context_of(self, channel: dict) -> tuple[int, bool]:
        """The interaction context of `channel`, and whether the app acts as installed to the user there."""
        if channel["type"] == 1:
            return IN_BOT_DM, False
        if channel["type"] == 3:
            return IN_PRIVATE_CHANNEL, True
        return IN_GUILD, channel["guild_id"] in self.foreign_guilds

    async def _interact(self, interaction: Interaction, person: dict, channel: dict, data: dict, roles: tuple[str, ...], message: dict | None = None) -> None:
        interaction.token = f"token-{interaction.id}"
        self.interactions[interaction.token] = interaction
        context, user_installed = self._context_of(channel)
        guild_id = channel.get("guild_id")
        owners = {"1": person["id"]} if user_installed or context == IN_BOT_DM else {"0": guild_id}
        interaction.user_installed_only = set(owners) == {"1"}
        payload: dict[str, Any] = {
            "id": interaction.id,
            "application_id": self.application_id,
            "type": interaction.type,
            "data": data,
            "channel_id": channel["id"],
            "channel": {k: v for k, v in channel.items() if k != "recipients"},
            "token": interaction.token,
            "version": 1,
            "locale": "en-US",
            # Outside its guilds a user-installed app may only answer the interaction (no channel permissions).
            "app_permissions": "0" if user_installed else "2248473465835073",
            "entitlements": [],
            "authorizing_integration_owners": owners,
            "context": context,
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if message is not None:
            payload["message"] = message
        if context != IN_GUILD:
            payload["user"] = person
        else:
            member = {**self._member(person, list(roles)), "user": person, "permissions": "0"}
            payload.update(guild_id=guild_id, guild_locale="en-US", member=member)
            if user_installed:
                payload["guild"] = {"id": guild_id, "locale": "en-US", "features": []}
        await self.dispatch("INTERACTION_CREATE", payload)

    async def dispatch(self, event: str, data: dict) -> None:
        """Send a gateway event to the session of its guild's shard (kept for replay if the bot is reconnecting)."""
        guild_id = data["id"] if event == "GUILD_CREATE" else data.get("guild_id")
        for session in self._sessions:
            if not session.serves(guild_id):
                continue
            payload = {"op": 0, "t": event, "s": len(session.sent) + 2, "d": data}  # READY was s=1
            session.sent.append(payload)
            if session.ws is not None and not session.ws.closed:
                with contextlib.suppress(ConnectionError):  # the bot is reconnecting: it gets the event when it resumes
                    await session.ws.send_str(json.dumps(payload))

    async def send_unparseable(self) -> None:
        """A message whose author's roles are objects instead of ids, as an independent
        Discord-compatible server (Spacebar) sent: discord.py's parser raises TypeError inside its
        gateway task, which ends the connection."""
        person = self.user("Ghost")
        member = {**self._member(person, []), "roles": [{"id": self.guild_id, "name": "@everyone"}]}
        await self.dispatch("MESSAGE_CREATE", self._message(self.text_channel["id"], person, "boo", keep=False, member=member))

    async def drop(self) -> None:
        """Drop every gateway connection (close code 1001, as a load balancer going away does)."""
        for session in self._sessions:
            if session.ws is not None:
                await session.ws.close(code=1001, message=b"Going away")

    async def reconnect(self, shard_id: int = 0) -> None:
        """Ask the bot to reconnect (op 7) a shard's session, as Discord does when it moves a session."""
        session = next(session for session in self._sessions if session.shard[0] == shard_id)
        await session.ws.send_str(json.dumps({"op": 7, "d": None}))

    # -- the gateway -------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        if not self.gateway_open:
            self.refused_connections += 1
            await self._notify()
            return web.Response(status=503, text="Service Unavailable")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                continue
            message = json.loads(frame.data)
            op, data = message.get("op"), message.get("d")
            if op == 1:
                await ws.send_str(json.dumps({"op": 11}))
            elif op == 2:
                await self._identify(ws, data)
            elif op == 6:
                await self._resume(ws, data)
        for session in self._sessions:
            if session.ws is ws:
                session.ws = None
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict) -> None:
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if data.get("intents", 0) & INTENT_MESSAGE_CONTENT and not self.message_content_enabled:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        shard = data.get("shard")
        shard_id, count = shard or (0, 1)
        if not 0 <= shard_id < count:
            await ws.close(code=4010, message=b"Invalid shard.")
            return
        if count < self.shards_required:
            await ws.close(code=4011, message=b"Sharding required.")
            return
        session = _Session(self.new_id(), (shard_id, count), ws)
        self._sessions = [other for other in self._sessions if other.shard[0] != shard_id] + [session]
        ready = {
            "v": 10,
            "user": self.bot,
            "guilds": [{"id": guild_id, "unavailable": True} for guild_id in self.guild_names if session.serves(guild_id)],
            "session_id": session.id,
            "resume_gateway_url": self.gateway_url,
            "application": {"id": self.application_id, "flags": 1 << 19 if self.message_content_enabled else 0},
            "private_channels": [],
        }
        if shard is not None:
            ready["shard"] = shard
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": 1, "d": ready}))
        for guild_id in self.guild_names:
            if session.serves(guild_id):
                await self.dispatch("GUILD_CREATE", self.guild(guild_id))
        if self.unparseable_on_identify:
            await self.send_unparseable()
        self.identified_shards.append(shard)
        self.sessions.append("identify")
        await self._notify()

    async def _resume(self, ws: web.WebSocketResponse, data: dict) -> None:
        session = next((session for session in self._sessions if session.id == data.get("session_id")), None)
        if session is None or data.get("token") != self.token:
            await ws.send_str(json.dumps({"op": 9, "d": False}))
            return
        session.ws = ws
        for payload in session.sent:
            if payload["s"] > (data.get("seq") or 0) - self.replay_overlap:
                await ws.send_str(json.dumps(payload))
        await ws.send_str(json.dumps({"op": 0, "t": "RESUMED", "s": None, "d": {}}))
        self.sessions.append("resume")
        await self._notify()

    # -- REST --------------------------------------------------------------------------------

    def _recorded(self, handler):
        async def record(request: web.Request) -> web.StreamResponse:
            body = await request.json() if request.can_read_body and request.content_type == "application/json" else None
            self.calls.append(Call(request.method, request.path.removeprefix("/api/v10"), dict(request.query), body))
            try:
                if not self._authorised(request):
                    return _json({"message": "401: Unauthorized", "code": 0}, 401)
                failure = self._failure(request)
                if failure is None:
                    return await handler(request, body)
                if failure.after:
                    await handler(request, body)
                self.failed.append(self.calls[-1])
                if failure.body is not None:
                    return _json(failure.body, failure.status)
                answer = {"message": failure.message, "code": failure.code}
                if failure.status == 429:  # discord.py takes a 429 without a Via header for a Cloudflare ban
                    answer |= {"retry_after": failure.retry_after, "global": False}
                    return web.Response(status=429, body=json.dumps(answer).encode(), headers={"Content-Type": "application/json", "Via": "1.1 google"})
                return _json(answer, failure.status)
            finally:
                await self._notify()

        return record

    def _failure(self, request: web.Request) -> RestFailure | None:
        path = request.path.removeprefix("/api/v10")
        failure = next((f for f in self.rest_failures if f.method == request.method and fnmatch.fnmatchcase(path, f.path)), None)
        if failure is not None and not failure.lasting:
            self.rest_failures.remove(failure)
        return failure

    def _authorised(self, request: web.Request) -> bool:
        """The bot token on every call but interaction responses and follow-ups (their token is in the path)."""
        sent = request.headers.get("Authorization")
        if request.path.startswith(("/api/v10/interactions/", "/api/v10/webhooks/")):
            return sent in (None, f"Bot {self.token}")
        return sent == f"Bot {self.token}"

    async def _unknown(self, request: web.Request) -> web.Response:
        self.unknown.append(f"{request.method} {request.path}")
        await self._notify()
        return _json({"message": "404: Not Found", "code": 0}, 404)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        attachment_id = request.match_info["id"]
        data, content_type = self.attachment_files[attachment_id]
        if attachment_id not in self.oversized:
            return web.Response(body=data, headers={"Content-Type": content_type})
        self.cdn_sent[attachment_id] = 0
        return await stream_oversized(request, data, self.oversized[attachment_id], content_type, lambda count: self.cdn_sent.__setitem__(attachment_id, count))

    async def _me(self, request, body) -> web.Response:
        return _json(self.bot)

    async def _application(self, request, body) -> web.Response:
        owner = self.user("Owner")
        return _json(
            {
                "id": self.application_id,
                "name": "IDEFICS",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": owner,
                "verify_key": "0" * 64,
                "flags": 1 << 19 if self.message_content_enabled else 0,
            }
        )

    async def _get_commands(self, request, body) -> web.Response:
        return _json(self.commands.get(request.match_info.get("guild", "global"), []))

    async def _put_commands(self, request, body) -> web.Response:
        scope = request.match_info.get("guild", "global")
        problem = next(filter(None, map(command_problem, body)), None)
        if problem is not None:
            return _invalid("commands", problem)
        self.command_syncs.append(scope)
        defaults = {"description": "", "options": [], "type": 1, "default_member_permissions": None, "nsfw": False}  # as Discord fills them in
        self.commands[scope] = [{**defaults, **command, "id": self.new_id(), "application_id": self.application_id, "version": "1"} for command in body]
        if scope != "global":
            for command in self.commands[scope]:
                command["guild_id"] = scope
        return _json(self.commands[scope])

    async def _get_channel(self, request, body) -> web.Response:
        channel = self.channels.get(request.match_info["channel"])
        return _json(channel) if channel else _json({"message": "Unknown Channel", "code": 10003}, 404)

    async def _typing(self, request, body) -> web.Response:
        return web.Response(status=204)

    async def _post_message(self, request, body) -> web.Response:
        channel_id = request.match_info["channel"]
        if not self.bot_can_post_in(self.channels[channel_id]):
            return _json({"message": "Missing Access", "code": 50001}, 403)
        problem = components_problem(body["components"]) if "components" in body else None
        if problem is not None:
            return _invalid("components", problem)
        if body.get("enforce_nonce"):  # the same nonce again within minutes: the message it created
            for message in self.bot_messages(channel_id):
                if message.get("nonce") == body.get("nonce"):
                    return _json(message)
        extra = {"nonce": body["nonce"]} if "nonce" in body else {}
        if body.get("components"):
            extra["components"] = body["components"]
        if body.get("message_reference"):
            reference = body["message_reference"]
            extra.update(type=19, message_reference=reference, referenced_message=self.messages.get(reference["message_id"]))
        message = self._message(channel_id, self.bot, body.get("content", ""), **extra)
        return _json(message)

    async def _edit_message(self, request, body) -> web.Response:
        message = self.messages.get(request.match_info["message"])
        if message is None:
            return _json({"message": "Unknown Message", "code": 10008}, 404)
        if message["author"]["id"] != self.bot["id"]:
            return _json({"message": "Cannot edit a message authored by another user", "code": 50005}, 403)
        return self._update_message(message, body)

    def _update_message(self, message: dict, body: dict) -> web.Response:
        """Apply an edit's content and components (absent: unchanged; [] removes the buttons)."""
        problem = components_problem(body["components"]) if body.get("components") else None
        if problem is not None:
            return _invalid("components", problem)
        message.update(content=body.get("content", message["content"]), edited_timestamp=TIMESTAMP)
        if "components" in body:
            message["components"] = body["components"] or []
        return _json(message)

    async def _delete_message(self, request, body) -> web.Response:
        self.messages.pop(request.match_info["message"], None)
        return web.Response(status=204)

    async def _create_thread(self, request, body) -> web.Response:
        parent = self.channels[request.match_info["channel"]]
        if parent["id"] in self.no_threads_in:
            return _json({"message": "Missing Permissions", "code": 50013}, 403)
        if parent["type"] != 0:
            return _json({"message": "Cannot execute action on this channel type", "code": 50024}, 400)
        name = body.get("name", "")
        if not 1 <= len(name) <= 100:
            return _json({"message": "Invalid Form Body", "code": 50035, "errors": {"name": "length"}}, 400)
        # A thread started from a message has the message's id.
        thread = self._thread(parent, name, self.bot["id"], thread_id=request.match_info["message"])
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return _json(thread)

    async def _callback(self, request, body) -> web.Response:
        interaction = self.interactions.get(request.match_info["token"])
        if interaction is None:
            return _json({"message": "Unknown interaction", "code": 10062}, 404)
        if interaction.responses:
            return _json({"message": "Interaction has already been acknowledged.", "code": 40060}, 400)
        kind = body["type"]
        if kind in (6, 7) and interaction.type != 3:
            return _invalid("type", "only a component interaction can update its message")
        if kind == 7:
            answer = self._update_message(self.messages[interaction.message_id], body.get("data", {}))
            if answer.status != 200:
                return answer
        problem = components_problem(body.get("data", {}).get("components")) if kind == 4 and body.get("data", {}).get("components") else None
        if problem is not None:
            return _invalid("components", problem)
        interaction.responses.append(body)
        if kind == 4:
            interaction.original = body["data"].get("content", "")
        result = {"interaction": {"id": interaction.id, "type": interaction.type, "response_message_loading": kind == 5}}
        if "with_response" in request.query:
            result["resource"] = {"type": kind}
            return _json(result)
        return web.Response(status=204)

    async def _followup(self, request, body) -> web.Response:
        interaction = self.interactions[request.match_info["token"]]
        if interaction.user_installed_only and len(interaction.followups) >= MAX_USER_INSTALL_FOLLOWUPS:
            return _json({"message": "This interaction has hit the maximum number of follow up messages", "code": 40094}, 400)
        message = self._message(interaction.channel_id, self.bot, body.get("content", ""), application_id=self.application_id, webhook_id=self.application_id)
        interaction.followups.append(message)
        return _json(message)

    async def _edit_webhook_message(self, request, body) -> web.Response:
        interaction = self.interactions[request.match_info["token"]]
        target = request.match_info["message"]
        if target == "@original" and interaction.message_id is not None:
            return self._update_message(self.messages[interaction.message_id], body)  # a button's message
        if target == "@original":
            interaction.original = body.get("content", interaction.original)
            message = self._message(
                interaction.channel_id, self.bot, interaction.original, keep=False, application_id=self.application_id, webhook_id=self.application_id
            )
            message["id"] = interaction.id  # the original response is not kept with the channel's messages
            return _json(message)
        message = self.messages[target]
        message.update(content=body.get("content", message["content"]))
        return _json(message)
