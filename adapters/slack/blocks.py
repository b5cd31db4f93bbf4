"""The Slack adapter's Block Kit: a Stop button on a reply being written, feedback buttons on a finished
one, and how a click names the reply it is about.

Action ids are fixed (Slack routes clicks to the adapter by them, and the manifest has no list of
them); the button's value says which reply: the asker and the reply's key for Stop, the stored
answer for feedback. A value is only a claim of the client: the adapter checks it against what it
knows (the reply being written, the person allowed to stop it).
"""

from __future__ import annotations

from dataclasses import dataclass

STOP = "idefics_stop"
FEEDBACK = "idefics_feedback"
DESCRIBE_IMAGE = "describe_image"  # the message shortcut's callback_id, as in slack-manifest.yml
UP, DOWN = "up", "down"


@dataclass(frozen=True)
class StopValue:
    """What a Stop button says: the reply (its key in the adapter) and who asked for it."""

    reply: str
    asker: str

    def encode(self) -> str:
        return f"{self.asker} {self.reply}"

    @classmethod
    def decode(cls, value: str) -> StopValue | None:
        asker, _, reply = value.partition(" ")
        return cls(reply, asker) if asker and reply else None


@dataclass(frozen=True)
class Vote:
    """A feedback click: the stored answer it rates, and the rating."""

    turn_id: int
    vote: str

    @classmethod
    def decode(cls, value: str) -> Vote | None:
        vote, _, turn = value.partition(" ")
        return cls(int(turn), vote) if vote in (UP, DOWN) and turn.isdigit() else None


def stop_button(stop: StopValue) -> dict:
    """The Stop button, in a block of its own."""
    button = {"type": "button", "action_id": STOP, "text": {"type": "plain_text", "text": "Stop"}, "style": "danger", "value": stop.encode()}
    return {"type": "actions", "elements": [button]}


def with_text(text: str, controls: list[dict]) -> list[dict]:
    """A message's blocks: its text (already escaped) in a section, then `controls`; none without controls.
    (With blocks, Slack shows the blocks and not the text, so the text goes into the first one.)"""
    return [{"type": "section", "text": {"type": "mrkdwn", "text": text}}, *controls] if controls else []


def feedback_blocks(turn_id: int) -> list[dict]:
    """Thumbs up / down under a finished answer (Slack's feedback buttons), for the stored answer `turn_id`."""
    buttons = {
        "type": "feedback_buttons",
        "action_id": FEEDBACK,
        "positive_button": {"text": {"type": "plain_text", "text": "Good answer"}, "value": f"{UP} {turn_id}", "accessibility_label": "Good answer"},
        "negative_button": {"text": {"type": "plain_text", "text": "Bad answer"}, "value": f"{DOWN} {turn_id}", "accessibility_label": "Bad answer"},
    }
    return [{"type": "context_actions", "elements": [buttons]}]


SECTION_LIMIT = 3000  # characters of text in a section block
