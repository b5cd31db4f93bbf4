"""The terminal adapter: chat with the bot on stdin/stdout, one conversation that persists.

    you> /image cat.jpg
    you> What is this animal?
    bot> A cat sitting on a sofa.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from bot.sdk.platform import Platform
from bot.sdk.settings import Section
from ground.conversation import Author, ConversationKey
from ground.messages import Final, IncomingMessage, Partial, Waiting

HELP = "Type a message. /image PATH_OR_URL attaches an image to your next message, /reset forgets this chat, /quit leaves."


class TerminalSettings(Section):
    """[terminal]: the name the person at the keyboard has in the conversation."""

    user_name: str = "you"


class TerminalChat:
    """An adapter for one person at a terminal (`idefics-bot chat` starts it; `run` doesn't)."""

    Settings = TerminalSettings
    delivery_errors = ()  # writing to the terminal either works or ends the chat
    name = "terminal"
    key = ConversationKey("terminal", "local")

    def __init__(self, platform: Platform, settings: TerminalSettings, stdin: TextIO | None = None, stdout: TextIO | None = None):
        self.platform = platform
        self.author = Author("terminal", settings.user_name)
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="terminal-chat")

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._task and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _say(self, text: str, end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    async def _loop(self) -> None:
        self._say(HELP)
        pending_images: list[str] = []
        while True:
            self._say(f"{self.author.name}> ", end="")
            line = await asyncio.to_thread(self.stdin.readline)
            if not line:  # end of input
                self._say("")
                return
            line = line.strip()
            if line in ("/quit", "/exit"):
                return
            if line == "/help":
                self._say(HELP)
            elif line == "/reset":
                count = await self.platform.reset(self.key)
                pending_images.clear()
                self._say(f"(Forgot this conversation: {count} turns.)")
            elif line.startswith("/image"):
                source = line.removeprefix("/image").strip()
                if source:
                    pending_images.append(source)
                    self._say(f"(Attached {source}; it goes with your next message.)")
                else:
                    self._say("(Usage: /image PATH_OR_URL)")
            elif line.startswith("/"):
                self._say(f"(Unknown command {line.split()[0]}. {HELP})")
            elif line or pending_images:
                attachments = tuple(self.platform.local_file(source) for source in pending_images)
                pending_images.clear()
                await self._answer(IncomingMessage(self.key, self.author, line, attachments))

    async def _answer(self, message: IncomingMessage) -> None:
        shown = ""
        self._say("bot> ", end="")
        async for event in self.platform.reply(message):
            if isinstance(event, Waiting):
                self._say(f"(waiting: #{event.position} in line) ", end="")
            elif isinstance(event, Partial):
                self._say(event.text[len(shown) :], end="")
                shown = event.text
            elif isinstance(event, Final):
                self._say(event.text[len(shown) :] if event.text.startswith(shown) else "\n" + event.text, end="")
                for note in event.notes:
                    self._say(f"\n({note})", end="")
                self._say("")
