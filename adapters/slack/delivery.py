"""Showing replies in Slack through its failures: a thread or DM as the `Surface` that `LiveReply`
drives, and which failed Web API calls are tried again.

- Rate limited (429): Slack did nothing, so any call waits out the Retry-After and is tried again.
- A server error (5xx) or a dropped connection: a call that changes nothing when repeated
  (`chat.update` sets a message's text; reads) is tried again after a growing pause.
- Posting is not like that: Slack says of `internal_error` and `fatal_error` that "some aspect of the
  operation" may have succeeded, and a connection that drops after the request went out leaves the
  same doubt. Posting again could show the message twice. So every post carries a mark in its message
  metadata; after such a failure the thread is read back, and the post is repeated only when the mark
  isn't there. If the thread can't be read (a private channel without `groups:history`, say), the
  post is not repeated: one missing reply, logged with its conversation, rather than a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.http_retry.interval_calculator import RetryIntervalCalculator
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.blocks import with_text
from adapters.slack.text import escape

log = logging.getLogger(__name__)

RETRIES = 3  # per call, after the first attempt
RETRY_BASE_S = 0.5  # the first pause after a server error; it doubles each time (with jitter)
# Methods that change something each time they are called: never repeated blindly (a stream's
# start posts, and each append adds its text again).
_NOT_REPEATABLE = frozenset(
    {
        *("chat.postMessage", "chat.postEphemeral", "chat.scheduleMessage", "chat.meMessage", "files.completeUploadExternal"),
        *("chat.startStream", "chat.appendStream"),
    }
)
_METADATA_TYPE = "idefics_reply"
_CLOCK_SKEW_S = 60.0  # how far Slack's clock may be behind ours, when reading back recent messages


def pause(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first) after a server error."""
    return RETRY_BASE_S * 2**attempt * random.uniform(0.5, 1.5)


class _GrowingPause(RetryIntervalCalculator):
    def calculate_sleep_duration(self, current_attempt: int) -> float:
        return pause(current_attempt)


class RepeatableCallRetryHandler(AsyncRetryHandler):
    """Tries a call again after a server error or a dropped connection, unless it posts something."""

    def __init__(self, max_retry_count: int = RETRIES):
        super().__init__(max_retry_count, _GrowingPause())

    async def _can_retry_async(
        self, *, state: RetryState, request: HttpRequest, response: HttpResponse | None = None, error: Exception | None = None
    ) -> bool:
        if request.url.rpartition("/")[2].partition("?")[0] in _NOT_REPEATABLE:
            return False
        if error is not None:
            return isinstance(error, (aiohttp.ClientConnectionError, TimeoutError))
        return response is not None and response.status_code >= 500


def retry_handlers() -> list[AsyncRetryHandler]:
    """The Web API client's retry policy (see the module's docstring)."""
    return [AsyncRateLimitErrorRetryHandler(max_retry_count=RETRIES), RepeatableCallRetryHandler()]


def transient(error: BaseException) -> bool:
    """Whether a failed call may work when tried again: a server error, or a connection problem."""
    if isinstance(error, SlackApiError):
        return error.response.status_code >= 500
    return isinstance(error, (aiohttp.ClientConnectionError, TimeoutError))


def may_have_posted(error: BaseException) -> bool:
    """Whether a post that failed so may have been posted all the same."""
    return transient(error) and not isinstance(error, aiohttp.ClientConnectorError)  # that one never connected


class SlackThread:
    """Where one reply is shown (a thread, or a DM): the `Surface` that `LiveReply` drives.

    Text is escaped, so the model can't ping anyone. Edits are retried by the client's handlers;
    posts as the module's docstring says. `controls` are blocks under the text (buttons): with them
    the text goes into a section block too, as Slack shows blocks instead of the text; `[]` on an
    edit removes them, None leaves the message without blocks."""

    def __init__(self, client: AsyncWebClient, channel: str, thread_ts: str | None):
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts

    async def post(self, text: str, controls: list[dict] | None = None) -> str:
        mark = uuid.uuid4().hex
        since = time.time() - _CLOCK_SKEW_S
        attempt = 0
        while True:
            try:
                response = await self.client.chat_postMessage(
                    channel=self.channel,
                    thread_ts=self.thread_ts,
                    text=escape(text),
                    blocks=with_text(escape(text), controls) if controls else None,
                    unfurl_links=False,
                    unfurl_media=False,
                    metadata={"event_type": _METADATA_TYPE, "event_payload": {"mark": mark}},
                )
                return response["ts"]
            except (SlackApiError, aiohttp.ClientError, TimeoutError) as error:
                if attempt == RETRIES or not transient(error):
                    raise
                if may_have_posted(error):
                    posted = await self._find(mark, since)
                    if posted is None:
                        raise
                    if posted:
                        log.info("slack.post_found", extra={"channel": self.channel, "attempt": attempt + 1})
                        return posted
            await asyncio.sleep(pause(attempt))
            attempt += 1

    async def edit(self, message: str, text: str, controls: list[dict] | None = None) -> None:
        blocks = None if controls is None else with_text(escape(text), controls)
        await self.client.chat_update(channel=self.channel, ts=message, text=escape(text), blocks=blocks)

    async def delete(self, message: str) -> None:
        """Remove one of the bot's messages; if Slack won't, it stays (logged)."""
        try:
            await self.client.chat_delete(channel=self.channel, ts=message)
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as error:
            reason = error.response.get("error") if isinstance(error, SlackApiError) else type(error).__name__
            log.warning("slack.delete_failed", extra={"channel": self.channel, "error": reason})

    async def _find(self, mark: str, since: float) -> str | None:
        """The ts of our message marked `mark` if it is in the thread (or DM), "" if it isn't, None
        if that can't be known."""
        window: dict[str, Any] = {"channel": self.channel, "oldest": f"{since:.6f}", "include_all_metadata": True, "limit": 100}
        try:
            if self.thread_ts:
                response = await self.client.conversations_replies(ts=self.thread_ts, **window)
            else:
                response = await self.client.conversations_history(**window)
        except (SlackApiError, aiohttp.ClientError, TimeoutError) as error:
            reason = error.response.get("error") if isinstance(error, SlackApiError) else type(error).__name__
            log.warning("slack.post_unknown", extra={"channel": self.channel, "error": reason})
            return None
        messages: list[dict[str, Any]] = response.get("messages", [])
        for message in messages:
            if (message.get("metadata") or {}).get("event_payload", {}).get("mark") == mark:
                return message["ts"]
        return ""
