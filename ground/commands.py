"""The command table every platform offers (the core runs the commands: `bot.core.commands`; adapters
show them in their own syntax)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Command:
    """One command of the table: the task it runs (None: no model call), what its text is, whether it
    falls back to the channel's last image, and the words its help shows."""

    name: str
    summary: str
    task: str | None = None
    text: Literal["question", "labels"] | None = None
    last_image: bool = False


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command("ask", "answer a question about an image", "chat", "question", last_image=True),
        Command("caption", "describe an image in a few words", "caption", last_image=True),
        Command("classify", "pick the label that fits an image", "classify", "labels", last_image=True),
        Command("story", "write a short story about an image", "story", last_image=True),
        Command("reset", "forget the conversation of this thread, or every conversation of this channel or DM"),
        Command("forget", "forget everything you said to me, everywhere, and the images only you sent"),
        Command("help", "show these commands"),
    )
}
IMAGE_COMMANDS = tuple(name for name, command in COMMANDS.items() if command.task)
LAST_IMAGE_HINT = "Without an image I use the last image I saw in this channel."
