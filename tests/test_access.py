"""Access rules: allow and block lists for users and channels, DMs and bots (every platform), and
Discord's guilds and roles."""

from __future__ import annotations

import pytest

from adapters.discord.settings import DiscordSettings, discord_refusal
from adapters.slack.adapter import SlackSettings
from bot.sdk.access import Requester, refusal_reason

ANYONE = Requester(user_id="u1", channel_id="c1")


@pytest.mark.parametrize(
    "rules, who, guild, roles, reason",
    [
        ({}, ANYONE, "g1", ("r1",), None),
        ({}, Requester("u1", "c1", is_self=True), "g1", (), "own message"),
        ({}, Requester("u1", "c1", is_bot=True), "g1", (), "bot"),
        ({"ignore_bots": False}, Requester("u1", "c1", is_bot=True), "g1", (), None),
        ({"allow_dms": False}, Requester("u1", "d1", is_dm=True), None, (), "dms disabled"),
        ({"blocked_users": ["u1"]}, ANYONE, "g1", (), "user"),
        ({"allowed_users": ["u2"]}, ANYONE, "g1", (), "user"),
        ({"allowed_users": ["u1"], "blocked_users": ["u1"]}, ANYONE, "g1", (), "user"),
        ({"blocked_channels": ["c1"]}, ANYONE, "g1", (), "channel blocked"),
        ({"blocked_channels": ["parent"]}, Requester("u1", "thread", parent_channel_id="parent"), "g1", (), "channel blocked"),
        ({"allowed_channels": ["parent"]}, Requester("u1", "thread", parent_channel_id="parent"), "g1", (), None),
        ({"allowed_channels": ["c9"]}, ANYONE, "g1", (), "channel not allowed"),
        ({"allowed_channels": ["c9"]}, Requester("u1", "d1", is_dm=True), None, (), None),
        ({"blocked_guilds": ["g1"]}, ANYONE, "g1", ("r1",), "guild"),
        ({"allowed_guilds": ["g2"]}, ANYONE, "g1", ("r1",), "guild"),
        ({"allowed_guilds": ["g2"]}, Requester("u1", "d1", is_dm=True), None, (), None),
        ({"blocked_roles": ["r1"]}, ANYONE, "g1", ("r1",), "role blocked"),
        ({"allowed_roles": ["r2"]}, ANYONE, "g1", ("r1",), "role not allowed"),
        ({"allowed_roles": ["r1"]}, ANYONE, "g1", ("r1",), None),
    ],
)
def test_discord_rules(rules, who, guild, roles, reason):
    assert discord_refusal(DiscordSettings(enabled=False, **rules), who, guild, roles) == reason


def test_slack_rules_are_the_shared_ones():
    assert refusal_reason(SlackSettings(enabled=False, blocked_users=["U1"]), Requester("U1", "C1")) == "user"
    assert refusal_reason(SlackSettings(enabled=False), Requester("U1", "C1")) is None
