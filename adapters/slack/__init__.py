"""Slack: Socket Mode or HTTP events, the slash command, the assistant pane, native streams, its
`[slack]` settings and access rules."""

from adapters.slack.adapter import SlackAdapter

__all__ = ["SlackAdapter"]
