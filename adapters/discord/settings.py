"""The Discord adapter's settings (`[discord]`) and its access rules: the shared ones of
`bot.sdk.access`, and Discord's guilds and roles on top."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from bot.sdk.access import AccessSettings, Requester, refusal_reason


class DiscordSettings(AccessSettings):
    """[discord]: the bot's token, where it answers and who may use it (users, channels, and Discord's
    own guilds and roles), sharding, and the API addresses (for tests)."""

    environment = {"token": "DISCORD_TOKEN"}

    token: SecretStr | None = None
    allowed_guilds: list[str] = []
    blocked_guilds: list[str] = []
    allowed_roles: list[str] = []
    blocked_roles: list[str] = []
    reply_in_thread: bool = True
    refusal_notice: bool = False  # tell refused users so (ephemerally) instead of ignoring them
    command_guild_ids: list[str] = []
    # Who may press the buttons on an answer: its asker only, unless these are on.
    anyone_can_stop: bool = False
    anyone_can_regenerate: bool = False
    api_base_url: str | None = None
    gateway_url: str | None = None
    # Sharding: the bot's guilds are split over `shard_count` gateway connections, and this process
    # runs `shard_ids` of them (default: all). Unset: one connection for every guild.
    shard_count: int | None = Field(None, ge=1, le=65536)
    shard_ids: list[int] | None = None
    # A gateway connection that ends in an error discord.py doesn't handle is opened again after
    # 1, 2, 4, ... seconds (at most 60); after this many failures in a row, `run` gives up and exits 1.
    reconnect_attempts: int = Field(5, ge=0, le=100)
    reconnect_backoff_s: float = Field(1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _shards(self) -> DiscordSettings:
        if self.shard_ids is None:
            return self
        if self.shard_count is None:
            raise ValueError("shard_ids needs shard_count, the number of shards the bot's processes share (e.g. shard_count = 2)")
        if not self.shard_ids:
            raise ValueError("shard_ids is empty: list the shards this process runs (e.g. [0]), or leave it out to run them all")
        wrong = [shard for shard in self.shard_ids if not 0 <= shard < self.shard_count]
        if wrong:
            count = self.shard_count
            raise ValueError(f"shard_ids {wrong} are not shards of shard_count = {count}: shard ids go from 0 to {count - 1}")
        if len(set(self.shard_ids)) != len(self.shard_ids):
            raise ValueError("shard_ids lists a shard twice")
        return self

    @model_validator(mode="after")
    def _ids_and_addresses(self) -> DiscordSettings:
        for guild_id in self.command_guild_ids:
            if not guild_id.isdigit():
                raise ValueError(
                    f"command_guild_ids holds server ids, numbers written as strings (got {guild_id!r}); "
                    "Developer Mode → right-click the server → Copy Server ID"
                )
        if self.api_base_url and not self.api_base_url.startswith(("http://", "https://")):
            raise ValueError('api_base_url must be an http:// or https:// address, e.g. "http://127.0.0.1:3001/api/v10"')
        if self.gateway_url and not self.gateway_url.startswith(("ws://", "wss://")):
            raise ValueError('gateway_url must be a ws:// or wss:// address, e.g. "ws://127.0.0.1:3001/gateway"')
        return self


def discord_refusal(rules: DiscordSettings, who: Requester, guild_id: str | None, role_ids: tuple[str, ...]) -> str | None:
    """Why `who` may not use the bot here (for logs), or None: the shared rules, then the guild's and
    the roles'. Block lists win over allow lists; DMs have no guild or roles."""
    reason = refusal_reason(rules, who)
    if reason is not None or who.is_dm:
        return reason
    if guild_id in rules.blocked_guilds or (rules.allowed_guilds and guild_id not in rules.allowed_guilds):
        return "guild"
    if set(role_ids) & set(rules.blocked_roles):
        return "role blocked"
    if rules.allowed_roles and not set(role_ids) & set(rules.allowed_roles):
        return "role not allowed"
    return None
