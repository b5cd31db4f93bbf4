"""Clicks on the Slack adapter's buttons: Stop on a reply being written, feedback on a finished one.

Each click is acknowledged at once. Stop works for the asker, in whichever process writes the reply (or anyone, with `[slack]
anyone_can_stop`); anyone else is told so in a note only they see. A vote is kept with the answer it
rates (one per person, the last counts) and counted in the metrics; a vote on an answer that is no
longer stored (the conversation was reset) is counted as such and the voter is told.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from adapters.slack.blocks import StopValue, Vote
from adapters.slack.reply import SlackReplies
from bot.sdk.access import AccessSettings, Requester, refusal_reason
from bot.sdk.platform import Platform
from bot.sdk.stopping import StopOutcome

log = logging.getLogger(__name__)

NOT_ALLOWED = "Only the person who asked can stop this answer."
ALREADY_DONE = "That answer is already finished."
THANKS = "Thanks for the feedback!"
GONE = "That answer is no longer part of the conversation, so the vote wasn't kept."

Respond = Callable[..., Awaitable[object]]


def _clicker(body: dict) -> tuple[str, str]:
    """The id and the name of who clicked."""
    user = body.get("user") or {}
    return user.get("id", ""), user.get("name") or user.get("username") or user.get("id", "")


class SlackActions:
    """Bolt's listeners for the buttons' action ids."""

    def __init__(self, platform: Platform, settings: AccessSettings, replies: SlackReplies):
        self.platform = platform
        self.settings = settings
        self.replies = replies

    def _allowed(self, body: dict) -> bool:
        channel = (body.get("channel") or {}).get("id", "")
        who = Requester(user_id=_clicker(body)[0], channel_id=channel, is_dm=channel.startswith("D"))
        return refusal_reason(self.settings, who) is None

    async def on_stop(self, ack: Callable[[], Awaitable[None]], body: dict, action: dict, respond: Respond) -> None:
        await ack()
        stop = StopValue.decode(action.get("value", ""))
        user, name = _clicker(body)
        outcome = await self.replies.writing.stop(stop.reply, user, name) if stop and self._allowed(body) else StopOutcome.NOT_ALLOWED
        self.platform.record(f"stop_{outcome}")
        log.info("slack.stop", extra={"outcome": str(outcome), "reply": stop.reply if stop else None})
        if outcome is StopOutcome.NOT_ALLOWED:
            await respond(text=NOT_ALLOWED, response_type="ephemeral", replace_original=False)
        elif outcome is StopOutcome.FINISHED:
            await respond(text=ALREADY_DONE, response_type="ephemeral", replace_original=False)

    async def on_feedback(self, ack: Callable[[], Awaitable[None]], body: dict, action: dict, respond: Respond) -> None:
        await ack()
        vote = Vote.decode(action.get("value", ""))
        if vote is None or not self._allowed(body):
            return
        recorded = await self.platform.record_feedback(vote.turn_id, _clicker(body)[0], vote.vote)
        log.info("slack.feedback", extra={"turn": vote.turn_id, "vote": vote.vote, "recorded": recorded})
        await respond(text=THANKS if recorded else GONE, response_type="ephemeral", replace_original=False)
