"""Discord things as the engine's inputs: who is asking (for the access rules), what they ask (without
the bot's mention), their files as attachments read only when needed, and a thread's name."""

from __future__ import annotations

import re
from collections.abc import Iterable

import aiohttp
import discord

from adapters.discord.settings import DiscordSettings, discord_refusal
from bot.sdk.access import SILENT, Requester
from bot.sdk.platform import ImagesConfig, download
from ground.messages import Attachment

PLATFORM = "discord"  # the platform part of conversation keys and message links
# The places a message can be posted in (discord.py names this union only while type checking).
Channel = (
    discord.TextChannel | discord.VoiceChannel | discord.StageChannel | discord.Thread | discord.DMChannel | discord.GroupChannel | discord.PartialMessageable
)
THREAD_NAME_LIMIT = 100
_MENTION = re.compile(r"<@[!&]?\d+>|<#\d+>")

# What a refused person is told when `refusal_notice` is on, by `bot.sdk.access.refusal_reason`.
_REFUSAL_NOTICES = {
    "dms disabled": "I don't answer direct messages; mention me in a server channel instead.",
    "channel blocked": "I don't answer in this channel.",
    "channel not allowed": "I don't answer in this channel.",
}
_REFUSAL_NOTICE = "Sorry, I'm not available to you here."


def refusal(
    rules: DiscordSettings,
    user: discord.abc.User,
    channel: discord.abc.Messageable | discord.abc.GuildChannel | None,
    me: discord.ClientUser,
    guild_id: int | None = None,
) -> str | None:
    """Why `user` writing in `channel` may not use the bot (a thread counts as its parent too), or None.
    `guild_id`: the channel's server when the bot may not know it (a command of a user install)."""
    guild = getattr(channel, "guild", None)
    guild_id = guild.id if guild is not None else guild_id
    parent = channel.parent_id if isinstance(channel, discord.Thread) else None
    who = Requester(
        user_id=str(user.id),
        channel_id=str(getattr(channel, "id", "")) if channel is not None else "",
        is_dm=guild_id is None,
        is_bot=user.bot,
        is_self=user.id == me.id,
        parent_channel_id=str(parent) if parent else None,
    )
    roles = tuple(str(role.id) for role in getattr(user, "roles", ()))
    return discord_refusal(rules, who, str(guild_id) if guild_id is not None else None, roles)


def refusal_notice(reason: str) -> str | None:
    """The short note for a refused person, or None when the refusal is silent (bots, the bot itself)."""
    if reason in SILENT:
        return None
    return _REFUSAL_NOTICES.get(reason, _REFUSAL_NOTICE)


def mentions_me(message: discord.Message, me: discord.ClientUser) -> bool:
    """Whether the message mentions the bot or its role (a reply pinging the bot counts too)."""
    if any(user.id == me.id for user in message.mentions):
        return True
    role = message.guild.self_role if message.guild is not None else None
    return role is not None and role.id in message.raw_role_mentions


def question_text(message: discord.Message, me: discord.ClientUser) -> str:
    """The message's text without the bot's mention, other mentions shown as the names people see."""
    names = {f"<@{me.id}>": "", f"<@!{me.id}>": ""}
    if message.guild is not None and message.guild.self_role is not None:
        names[f"<@&{message.guild.self_role.id}>"] = ""
    for user in message.mentions:
        names.setdefault(f"<@{user.id}>", f"@{user.display_name}")
        names.setdefault(f"<@!{user.id}>", f"@{user.display_name}")
    names.update({f"<@&{role.id}>": f"@{role.name}" for role in message.role_mentions if f"<@&{role.id}>" not in names})
    for channel_id in message.raw_channel_mentions:
        channel = message.guild.get_channel_or_thread(channel_id) if message.guild is not None else None
        if channel is not None:
            names[f"<#{channel_id}>"] = f"#{channel.name}"
    text = _MENTION.sub(lambda match: names.get(match.group(0), match.group(0)), message.content)
    return text.strip()


def attachment_of(file: discord.Attachment, images: ImagesConfig) -> Attachment:
    """A Discord attachment for the engine. The engine checks the size Discord reports before it
    reads; the download stops at the limit all the same, since the file may be larger than it claims."""
    timeout = aiohttp.ClientTimeout(total=images.fetch_timeout_s, sock_connect=images.connect_timeout_s)

    async def read(max_bytes: int) -> bytes:
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            return await download(session, file.url, max_bytes, name=file.filename, source=" from Discord")

    return Attachment(name=file.filename, read=read, size=file.size, content_type=file.content_type)


def attachments_of(files: Iterable[discord.Attachment], images: ImagesConfig) -> tuple[Attachment, ...]:
    return tuple(attachment_of(file, images) for file in files)


def thread_name(question: str, attachments: Iterable[Attachment] = ()) -> str:
    """A thread's name (1-100 characters): the question's beginning, or the image's name."""
    name = " ".join(question.split())
    if not name:
        first = next(iter(attachments), None)
        name = f"About {first.name}" if first is not None else "A question for IDEFICS"
    return name if len(name) <= THREAD_NAME_LIMIT else name[: THREAD_NAME_LIMIT - 1].rstrip() + "…"
