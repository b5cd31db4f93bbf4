"""Discord: the gateway client, slash commands and buttons, its `[discord]` settings and access rules."""

from adapters.discord.adapter import DiscordAdapter

__all__ = ["DiscordAdapter"]
