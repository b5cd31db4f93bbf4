"""What a conversation is: a key (platform, channel, thread) and the turns said in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ConversationKey:
    """Where a conversation happens. A DM is a channel; `thread` is "" outside threads."""

    platform: str
    channel: str
    thread: str = ""

    def __str__(self) -> str:
        return f"{self.platform}:{self.channel}:{self.thread}" if self.thread else f"{self.platform}:{self.channel}"


@dataclass(frozen=True)
class Author:
    """Who said something: the platform's id and the name people see."""

    id: str
    name: str


@dataclass(frozen=True)
class ImageRef:
    """An image kept in the store, known by its content hash; `name` is the file name it came with."""

    digest: str
    name: str


Part = str | ImageRef


@dataclass(frozen=True)
class Turn:
    """One utterance: the user's text and images in the order posted, or the assistant's reply.

    `dropped` (assistant turns) counts the earlier turns that did not fit into that reply's input.
    """

    role: Literal["user", "assistant"]
    parts: tuple[Part, ...]
    author: Author | None = None
    message_id: str = ""
    dropped: int = 0
    id: int | None = field(default=None, compare=False)

    @property
    def text(self) -> str:
        return "\n".join(part for part in self.parts if isinstance(part, str))

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(part for part in self.parts if isinstance(part, ImageRef))


@dataclass(frozen=True)
class Unanswered:
    """A user turn that was stored but never answered: the process answering it (`answerer`) was
    stopped hard (killed, a crash, a power cut) while replying. `turn` carries its id, author and
    platform message id; `reply` the ids of the messages that process had posted for its answer."""

    key: ConversationKey
    turn: Turn
    answerer: str = ""
    reply: tuple[str, ...] = ()
