"""Who may talk to the bot: allow and block lists of users and channels, DMs and bots, checked before
any model call. Every chat adapter's settings have these rules; an adapter adds its platform's own
(Discord's guilds and roles) on top."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.sdk.settings import AdapterSettings


class AccessSettings(AdapterSettings):
    """Who may talk to the bot on a platform; empty allow lists allow everyone, block lists always win."""

    allowed_users: list[str] = []
    blocked_users: list[str] = []
    allowed_channels: list[str] = []
    blocked_channels: list[str] = []
    allow_dms: bool = True
    ignore_bots: bool = True


@dataclass(frozen=True)
class Requester:
    """Everything the access rules look at, in platform ids."""

    user_id: str
    channel_id: str
    is_dm: bool = False
    is_bot: bool = False
    is_self: bool = False
    # A thread's parent channel: rules about a channel cover its threads.
    parent_channel_id: str | None = None


# Reasons that are no refusal of a person: the bot's own messages, and other bots'.
SILENT = frozenset({"own message", "bot"})


def allowed(value: str | None, allow: Sequence[str], block: Sequence[str]) -> bool:
    """Whether `value` passes an allow list (empty: everyone) and a block list (which wins)."""
    if value is not None and value in block:
        return False
    return not allow or (value is not None and value in allow)


def refusal_reason(rules: AccessSettings, who: Requester) -> str | None:
    """Why `who` may not use the bot (for logs), or None when they may. Block lists win over allow lists."""
    if who.is_self:
        return "own message"
    if who.is_bot and rules.ignore_bots:
        return "bot"
    if who.is_dm and not rules.allow_dms:
        return "dms disabled"
    if not allowed(who.user_id, rules.allowed_users, rules.blocked_users):
        return "user"
    channels = {who.channel_id, who.parent_channel_id} - {None}
    if channels & set(rules.blocked_channels):
        return "channel blocked"
    if rules.allowed_channels and not who.is_dm and not channels & set(rules.allowed_channels):
        return "channel not allowed"
    return None
