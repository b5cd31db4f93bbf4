"""What flows between adapters and the core, free of any platform's types: messages and commands in,
reply events out.

    adapter -> IncomingMessage / CommandRequest -> Engine -> Waiting / Working / Partial / Final -> adapter
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ground.conversation import Author, ConversationKey

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".heic", ".heif", ".avif"}


@dataclass(frozen=True)
class Attachment:
    """A file that came with a message. `read(max_bytes)` fetches it (lazily: ignored files never are)."""

    name: str
    read: Callable[[int], Awaitable[bytes]]
    size: int | None = None
    content_type: str | None = None

    def looks_like_image(self) -> bool:
        """False only when both the type and the name say it is something else."""
        if self.content_type is None or self.content_type.startswith("image/"):
            return True
        return Path(self.name).suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class IncomingMessage:
    """A message for the bot. `shared`: several people talk here (speakers are named in the prompt)."""

    key: ConversationKey
    author: Author
    text: str = ""
    attachments: tuple[Attachment, ...] = ()
    message_id: str = ""
    shared: bool = False


@dataclass(frozen=True)
class CommandRequest:
    """A command of the shared table (`ground.commands.COMMANDS`), run where `key` says: a thread
    (key.thread set), or a channel or DM. `text` is the question (ask) or the labels (classify)."""

    command: str
    key: ConversationKey
    author: Author
    attachments: tuple[Attachment, ...] = ()
    text: str = ""


@dataclass(frozen=True)
class TaskRequest:
    """A one-off image task by name (`bot.core.tasks.TASKS`). With `last_image`, a request without
    images uses the last image seen in the channel."""

    task: str
    key: ConversationKey
    author: Author
    attachments: tuple[Attachment, ...] = ()
    question: str = ""
    labels: str = ""
    last_image: bool = False


@dataclass(frozen=True)
class Waiting:
    """The request waits for the model; `position` 1 is next."""

    position: int


@dataclass(frozen=True)
class Working:
    """The model has started on the reply; its text follows."""


@dataclass(frozen=True)
class Partial:
    """The reply so far (the whole text, not a delta)."""

    text: str


@dataclass(frozen=True)
class Final:
    """The end of a reply: the model's text ("" when there is none) and notes for the asker.
    `turn_id`: the answer as stored in its conversation (None when nothing was stored), which
    feedback and "regenerate" refer to."""

    text: str
    notes: tuple[str, ...] = ()
    turn_id: int | None = None


ReplyEvent = Waiting | Working | Partial | Final


class Refusal(Exception):
    """Input that ends the request with this message to the asker and no model call."""
