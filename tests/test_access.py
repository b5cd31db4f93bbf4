"""Access rules: allow and block lists for users, channels, guilds and roles; DMs; bots."""

from __future__ import annotations

import pytest

from bot.platform.access import Requester, refusal_reason
from bot.runtime.config import DiscordConfig, SlackConfig

ANYONE = Requester(user_id="u1", channel_id="c1", guild_id="g1", role_ids=("r1",))


@pytest.mark.parametrize(
    "rules, who, reason",
    [
        ({}, ANYONE, None),
        ({}, Requester("u1", "c1", is_self=True), "own message"),
        ({}, Requester("u1", "c1", is_bot=True), "bot"),
        ({"ignore_bots": False}, Requester("u1", "c1", is_bot=True), None),
        ({"allow_dms": False}, Requester("u1", "d1", is_dm=True), "dms disabled"),
        ({"blocked_users": ["u1"]}, ANYONE, "user"),
        ({"allowed_users": ["u2"]}, ANYONE, "user"),
        ({"allowed_users": ["u1"], "blocked_users": ["u1"]}, ANYONE, "user"),
        ({"blocked_channels": ["c1"]}, ANYONE, "channel blocked"),
        ({"blocked_channels": ["parent"]}, Requester("u1", "thread", parent_channel_id="parent"), "channel blocked"),
        ({"allowed_channels": ["parent"]}, Requester("u1", "thread", parent_channel_id="parent"), None),
        ({"allowed_channels": ["c9"]}, ANYONE, "channel not allowed"),
        ({"allowed_channels": ["c9"]}, Requester("u1", "d1", is_dm=True), None),
        ({"blocked_guilds": ["g1"]}, ANYONE, "guild"),
        ({"allowed_guilds": ["g2"]}, ANYONE, "guild"),
        ({"blocked_roles": ["r1"]}, ANYONE, "role blocked"),
        ({"allowed_roles": ["r2"]}, ANYONE, "role not allowed"),
        ({"allowed_roles": ["r1"]}, ANYONE, None),
    ],
)
def test_discord_rules(rules, who, reason):
    assert refusal_reason(DiscordConfig(enabled=False, **rules), who) == reason


def test_slack_rules_have_no_guilds_or_roles():
    assert refusal_reason(SlackConfig(enabled=False, blocked_users=["U1"]), Requester("U1", "C1")) == "user"
    assert refusal_reason(SlackConfig(enabled=False), Requester("U1", "C1")) is None
