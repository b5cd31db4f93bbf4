"""Who may talk to the bot: allow and block lists from the config, checked before any model call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.runtime.config import AccessConfig


@dataclass(frozen=True)
class Requester:
    """Everything the access rules look at, in platform ids."""

    user_id: str
    channel_id: str
    is_dm: bool = False
    is_bot: bool = False
    is_self: bool = False
    guild_id: str | None = None
    role_ids: tuple[str, ...] = ()
    # A thread's parent channel: rules about a channel cover its threads.
    parent_channel_id: str | None = None


def _allowed(value: str | None, allowed: Sequence[str], blocked: Sequence[str]) -> bool:
    if value is not None and value in blocked:
        return False
    return not allowed or (value is not None and value in allowed)


def refusal_reason(rules: AccessConfig, who: Requester) -> str | None:
    """Why `who` may not use the bot (for logs), or None when they may. Block lists win over allow lists."""
    if who.is_self:
        return "own message"
    if who.is_bot and rules.ignore_bots:
        return "bot"
    if who.is_dm and not rules.allow_dms:
        return "dms disabled"
    if not _allowed(who.user_id, rules.allowed_users, rules.blocked_users):
        return "user"
    channels = {who.channel_id, who.parent_channel_id} - {None}
    if channels & set(rules.blocked_channels):
        return "channel blocked"
    if rules.allowed_channels and not who.is_dm and not channels & set(rules.allowed_channels):
        return "channel not allowed"
    guilds_allowed, guilds_blocked = getattr(rules, "allowed_guilds", []), getattr(rules, "blocked_guilds", [])
    if not who.is_dm and not _allowed(who.guild_id, guilds_allowed, guilds_blocked):
        return "guild"
    roles_allowed, roles_blocked = getattr(rules, "allowed_roles", []), getattr(rules, "blocked_roles", [])
    if set(who.role_ids) & set(roles_blocked):
        return "role blocked"
    if roles_allowed and not who.is_dm and not set(who.role_ids) & set(roles_allowed):
        return "role not allowed"
    return None
