"""Slack's assistant panel (the AI-app surface), through Bolt's `AsyncAssistant`.

When someone opens a thread with the bot in the panel, it greets them and offers suggested prompts.
Messages in an assistant thread are conversations of their own (one per thread, as in a DM) and go
through the adapter's usual path; the first question names the thread. While the model works, the
thread's status line says what is happening (set by the adapter through `set_status`).

Bolt's default handling of `assistant_thread_context_changed` reads the thread back and rewrites the
bot's first message; the bot doesn't use the context (the channel the person is looking at), so the
change is only acknowledged: no Web API call, and nothing of Slack's rate-limited history reads.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from slack_bolt.async_app import AsyncAssistant
from slack_bolt.request.async_request import AsyncBoltRequest

log = logging.getLogger(__name__)

GREETING = (
    "Hi! I'm IDEFICS, and I look at images. Attach one (or paste a link to it) and ask me about it: "
    "I can describe it, read what's written in it, count things or write a story about it."
)
PROMPTS = (
    {"title": "Describe an image", "message": "Describe this image in detail."},
    {"title": "What's written here?", "message": "What's written in this picture?"},
    {"title": "Count things", "message": "How many people are in this picture?"},
    {"title": "Tell a story", "message": "Write a short story inspired by this image."},
)
TITLE_LENGTH = 60

OnMessage = Callable[[dict, dict, AsyncBoltRequest], Awaitable[None]]
OnStarted = Callable[[dict, dict], Awaitable[None]]


def thread_title(question: str) -> str:
    """An assistant thread's title from its first question: its first line, shortened on a word."""
    line = question.strip().splitlines()[0] if question.strip() else ""
    if len(line) <= TITLE_LENGTH:
        return line or "An image"
    return line[: TITLE_LENGTH - 1].rsplit(" ", 1)[0].rstrip(",.;:") + "…"


def assistant(on_started: OnStarted, on_message: OnMessage) -> AsyncAssistant:
    """The assistant's listeners: `on_started(event, body)` greets (the adapter posts once per thread,
    whatever Slack's retries), `on_message(event, body, request)` answers a message of a thread."""
    panel = AsyncAssistant()

    @panel.thread_started
    async def started(event: dict, body: dict) -> None:
        await on_started(event, body)

    @panel.thread_context_changed
    async def context_changed(event: dict) -> None:
        log.debug("slack.assistant_context", extra={"channel": event.get("assistant_thread", {}).get("channel_id")})

    @panel.user_message
    async def user_message(event: dict, body: dict, request: AsyncBoltRequest) -> None:
        await on_message(event, body, request)

    return panel
