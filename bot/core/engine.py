"""The engine: the core's front, from an incoming message or command to a streamed reply.

    adapter -> IncomingMessage -> Engine.reply() -> Waiting / Working / Partial / Final -> adapter

It admits the request (`admission`), then hands it to the part that does the job: conversation turns
(`turns`: image intake, the conversation's place and context, storing both turns), commands and
one-off tasks (`commands`), both streaming from the model through `generation`. Every problem a person
can cause or meet ends as a `Final` whose notes say, in plain words, what happened. Adapters reach the
engine through their `bot.sdk.platform.Platform`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from bot.core.admission import Admission
from bot.core.commands import Commands
from bot.core.generation import Generation
from bot.core.turns import Conversations
from bot.images.attachments import ImageIntake
from bot.metrics import Metrics
from bot.settings import Settings
from bot.state.store import Store
from ground.conversation import Author, ConversationKey, Unanswered
from ground.messages import Attachment, CommandRequest, Final, IncomingMessage, ReplyEvent, TaskRequest
from model.service import ModelService


class Engine:
    """Ties turns to replies; shared by every adapter in the process."""

    def __init__(self, config: Settings, model: ModelService, store: Store, metrics: Metrics):
        self.config = config
        limits = config.limits
        rates = store.request_buckets(limits.per_user_per_minute, limits.per_user_burst) if limits.per_user_per_minute else None
        self.admission = Admission(metrics, config.conversation.max_message_chars, rates)
        self.intake = ImageIntake(config.images, store, model)
        self.generation = Generation(config, model, store, metrics)
        self.conversations = Conversations(config, store, self.intake, self.generation, metrics)
        self.commands = Commands(config, self.intake, self.generation, self.conversations, metrics)

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait up to `timeout` s for those in flight; True if all finished."""
        return await self.admission.drain(timeout)

    async def _admitted(self, platform: str, author: Author | None, work: AsyncIterator[ReplyEvent], *texts: str) -> AsyncIterator[ReplyEvent]:
        refusal = self.admission.too_long(*texts) or await self.admission.refusal(platform, author)
        if refusal:
            yield Final("", (refusal,))
            return
        async with self.admission.tracked():
            async for event in work:
                yield event

    def reply(self, message: IncomingMessage) -> AsyncIterator[ReplyEvent]:
        """Answer one message in its conversation, streaming the reply."""
        return self._admitted(message.key.platform, message.author, self.conversations.reply(message), message.text)

    async def unanswered(self, platform: str) -> list[Unanswered]:
        """Messages of `platform` that a stopped process stored but never answered (it was killed while
        replying), at most [bot] resume_window_s old, oldest first: adapters resume them at start-up."""
        return await self.conversations.unanswered(platform)

    def resume(self, pending: Unanswered, shared: bool) -> AsyncIterator[ReplyEvent]:
        """Answer `pending` in its conversation, as `reply` would have, without adding a turn; the
        answer carries a note saying it comes late. If the conversation moved on meanwhile, it ends with
        an empty Final: nothing to show. `shared` as in `IncomingMessage`."""
        return self._admitted(pending.key.platform, None, self.conversations.resume(pending, shared))

    def regenerate(self, key: ConversationKey, turn_id: int, author: Author, shared: bool) -> AsyncIterator[ReplyEvent]:
        """Answer again the question of the conversation's latest answer `turn_id`; the new answer
        replaces it. `shared` as in `IncomingMessage`."""
        return self._admitted(key.platform, author, self.conversations.regenerate(key, turn_id, shared))

    async def record_feedback(self, platform: str, turn_id: int, user_id: str, vote: str) -> bool:
        """Keep a person's vote ("up" or "down") on a stored answer; False if it is no longer stored."""
        return await self.conversations.record_feedback(platform, turn_id, user_id, vote)

    async def latest_answer(self, key: ConversationKey) -> int | None:
        """The id of the conversation's latest stored answer, if its latest turn is one."""
        return await self.conversations.latest_answer(key)

    def command(self, request: CommandRequest) -> AsyncIterator[ReplyEvent]:
        """Run a command of the shared table (`bot.core.commands`)."""
        return self._admitted(request.key.platform, request.author, self.commands.run(request), request.text)

    def run_task(self, request: TaskRequest) -> AsyncIterator[ReplyEvent]:
        """Run a one-off task on the given image; nothing is added to the conversation."""
        return self._admitted(request.key.platform, request.author, self.commands.run_task(request), request.question, request.labels)

    async def reset(self, key: ConversationKey) -> int:
        """Forget a conversation (waits for a reply in progress there to finish first)."""
        return await self.conversations.reset(key)

    def link(self, url: str) -> Attachment:
        """An attachment for an image link somebody gave, fetched under the link rules."""
        return self.intake.link(url)
