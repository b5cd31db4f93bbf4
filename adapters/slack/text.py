"""Text between Slack and the model: Slack's markup read as plain text, and our text made inert.

Slack sends `&`, `<` and `>` escaped and wraps mentions and links in angle brackets
(`<@U123>`, `<!here>`, `<#C1|general>`, `<https://x.org/cat.png|cat>`). The model reads the plain form;
whatever we post is escaped again, so no text of the model's can ping `@channel` or a person.
"""

from __future__ import annotations

import re

_MARKUP = re.compile(r"<([^<>\n]*)>")


def escape(text: str) -> str:
    """`text` as Slack shows it literally: no mentions, links or broadcasts can form."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def plain_text(text: str, bot_user_id: str = "") -> str:
    """A Slack message's text as the person saw it, without the mention of the bot itself."""

    def readable(match: re.Match) -> str:
        target, _, label = match.group(1).partition("|")
        if bot_user_id and target == f"@{bot_user_id}":
            return ""
        if target[:1] in ("@", "#"):  # a person or a channel
            name = label or target[1:]
            return name if name.startswith(target[0]) else target[0] + name
        if target.startswith("!"):  # <!here>, <!channel>, <!subteam^S1|@team>, <!date^...|fallback>
            return label or "@" + target[1:].split("^")[0]
        return target  # a link: the address itself, which may be an image to look at

    text = _MARKUP.sub(readable, text)
    # &amp; last, so that an escaped "&lt;" typed by the person stays "&lt;".
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").strip()
