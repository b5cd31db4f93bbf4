"""The commands every platform offers, in one table (`ground.commands`), so a command means the same everywhere:

    ask       a question about an image: the instruct format (like a chat turn), up to the `chat`
              task's reply budget (512 tokens unless [tasks] max_new_tokens says otherwise)
    caption   a short caption (the guide's captioning prompt; `caption` budget, 10 tokens)
    classify  one of the given labels (the guide's classification prompt; the model weighs each label and writes nothing)
    story     a short story the image inspires (the guide's story prompt; `story` budget, 200 tokens)
    reset     forget conversations: run in a thread, that thread's; run in a channel or DM, every
              conversation of the channel or DM (a Slack command can't say which thread it came from,
              so both platforms treat a channel alike)
    forget    forget the person who runs it: their messages in every conversation of the platform,
              the answers to them and the images only they sent (the answer is for them only)
    help      what the commands are (each adapter shows them in its own syntax)

The image commands take an attached image or a link; without one, they use the last image the bot saw
in the channel, and say so. Adapters parse their platform's syntax into a `CommandRequest` and show the
reply events; the core runs the rest here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from bot.core.generation import Generation, LoadedImages
from bot.core.prompt import PromptTooLong, check_fits
from bot.core.ranking import classify, named_label
from bot.core.tasks import FewShotPair, TaskError, TaskPrompt, build_task, task_length
from bot.core.turns import Conversations, unsaved
from bot.images.attachments import ImageIntake
from bot.images.intake import ImageRejected
from bot.metrics import Metrics
from bot.settings import Settings
from bot.state.store import Forgotten, StoreUnavailable
from ground.commands import COMMANDS, Command
from ground.conversation import ConversationKey
from ground.files import FileTooLarge, NotARegularFile, read_regular_file
from ground.messages import CommandRequest, Final, Partial, Refusal, ReplyEvent, TaskRequest, Working
from model.service import ModelError, ScoringUnavailable

_NEEDS = {"question": "a question, e.g. “What is in this picture?”", "labels": 'labels, e.g. "cat, dog, bird"'}


class CommandError(ValueError):
    """Not a command of the table."""


def command_named(name: str) -> Command:
    """The command called `name` (any case), or `CommandError` listing the commands."""
    command = COMMANDS.get(name.strip().lower())
    if command is None:
        raise CommandError(f"I don't know “{name}”. The commands are: {', '.join(COMMANDS)}.")
    return command


def forgotten_text(gone: Forgotten) -> str:
    """What `forget` says it did."""
    if not gone.turns and not gone.images:
        return "There was nothing to forget: I have no messages from you."
    images = f" and {gone.images} image{'s' if gone.images != 1 else ''} only you sent" if gone.images else ""
    return f"Done: I forgot you everywhere: {gone.turns} messages (yours and my answers to them){images}."


def reset_text(key: ConversationKey, conversations: int, turns: int) -> str:
    """What `reset` says it did: `key` is where it was run (a thread, or a channel or DM)."""
    if not turns:
        return "There was nothing to forget here."
    if key.thread:
        return f"Forgot this conversation ({turns} messages); the next message starts afresh."
    what = "1 conversation" if conversations == 1 else f"{conversations} conversations"
    return f"Forgot {what} here ({turns} messages); the next message starts afresh."


class Commands:
    """Runs commands and one-off tasks; nothing they do is added to a conversation (reset aside)."""

    def __init__(self, config: Settings, intake: ImageIntake, generation: Generation, conversations: Conversations, metrics: Metrics):
        self.config = config
        self.intake = intake
        self.generation = generation
        self.conversations = conversations
        self.metrics = metrics
        self._few_shot: list[FewShotPair] | None = None

    async def run(self, request: CommandRequest) -> AsyncIterator[ReplyEvent]:
        """The reply to a command of the table (help aside, which adapters render)."""
        command = COMMANDS.get(request.command)
        if command is None or command.name == "help":
            yield Final("", (f"I don't know “{request.command}”. The commands are: {', '.join(COMMANDS)}.",))
            return
        if command.name == "reset":
            key = request.key
            if key.thread:
                conversations, turns = 1, await self.conversations.reset(key)
            else:
                conversations, turns = await self.conversations.reset_channel(key.platform, key.channel)
            yield Final(reset_text(key, conversations, turns))
            return
        if command.name == "forget":
            yield Final(forgotten_text(await self.conversations.forget(request.key.platform, request.author)))
            return
        assert command.task is not None
        text = request.text.strip()
        if command.text and not text:
            yield Final("", (f"/{command.name} needs {_NEEDS[command.text]}",))
            return
        task = TaskRequest(
            command.task,
            request.key,
            request.author,
            request.attachments,
            question=text if command.text == "question" else "",
            labels=text if command.text == "labels" else "",
            last_image=command.last_image,
        )
        async for event in self.run_task(task):
            yield event

    async def run_task(self, request: TaskRequest) -> AsyncIterator[ReplyEvent]:
        """Run a task on the given images (or, with `last_image`, the channel's last one)."""
        notes: list[str] = []
        loaded: LoadedImages = {}
        try:
            refs, notes = await self.intake.take_in(request.key, request.attachments, "")
            if not refs and request.last_image:
                last = await self.intake.store.last_image(request.key.platform, request.key.channel)
                if last is None:
                    raise Refusal("Give me an image (attach one or paste a link): I haven't seen one in this channel yet.")
                refs, notes = [last], [*notes, f"I used the last image I saw in this channel ({last.name})."]
            prompt = build_task(
                request.task,
                refs,
                question=request.question,
                labels=request.labels,
                examples=await self._few_shot_examples() if request.task == "few_shot" else (),
                system_prompt=self.config.conversation.system_prompt,
                max_new_tokens={str(task): tokens for task, tokens in self.config.tasks.max_new_tokens.items()},
                num_beams={str(task): beams for task, beams in self.config.tasks.num_beams.items()},
                special_tokens=self.generation.model.info.special_tokens,
            )
            model = self.generation.model
            # A ranking reads each label after the prompt instead of a reply: the longest must fit.
            longest = prompt.chat.continued(max(prompt.labels, key=len)) if prompt.labels else prompt.chat
            await check_fits(longest, self.generation.token_counter(loaded), context_tokens=model.info.context_tokens, reserve_tokens=prompt.max_new_tokens)
        except (Refusal, TaskError, PromptTooLong) as refusal:
            self.metrics.error("too_long" if isinstance(refusal, PromptTooLong) else "input_refused")
            yield Final("", (*notes, str(refusal)))
            return
        except ModelError as error:  # a remote model counts tokens on its server, which can fail
            self.metrics.error(type(error).__name__)
            yield Final("", (*notes, str(error)))
            return
        except StoreUnavailable as error:
            yield unsaved(self.metrics, f"{request.key} task={request.task}", error)
            return
        if prompt.labels:
            yield Working()
            try:
                ranking = await classify(
                    self.generation.model,
                    await self.generation.model_prompt(prompt.chat, loaded),
                    prompt.labels,
                    queue_timeout=self.config.model.queue_timeout_s,
                    timeout=self.config.model.generation_timeout_s,
                    label=f"{request.key} task=classify",
                )
            except ScoringUnavailable:
                async for event in self._label_named(request, prompt, notes, loaded):
                    yield event
                return
            except ModelError as error:
                self.metrics.error(type(error).__name__)
                yield Final("", (*notes, str(error)))
                return
            yield Final(ranking.answer(), tuple(notes))
            return
        async for event in self.generation.stream(prompt.chat, prompt.max_new_tokens, f"{request.key} task={request.task}", loaded, prompt.num_beams):
            if isinstance(event, Final):
                event = Final(event.text, (*notes, *event.notes))
                if not event.text and not event.notes:
                    event = Final("", ("The model gave an empty reply.",))
            yield event

    async def _label_named(self, request: TaskRequest, prompt: TaskPrompt, notes: list[str], loaded: LoadedImages) -> AsyncIterator[ReplyEvent]:
        """Classification on a model that can't weigh labels: the guide's free-generation form, and
        the label the model names, said to be approximate."""
        length = task_length("classify_generate", self.config.tasks.max_new_tokens)
        async for event in self.generation.stream(prompt.chat, length, f"{request.key} task=classify", loaded):
            if isinstance(event, Partial):
                continue  # the model's own words are not the answer
            if not isinstance(event, Final):
                yield event
                continue
            label = named_label(event.text, prompt.labels) if event.text else None
            if label is not None:
                yield Final(f"{label} (approximate: this model server can't weigh the labels, so this is the one the model named)", (*notes, *event.notes))
            elif event.text:
                yield Final("", (*notes, f'The model answered "{event.text[:100]}", which is none of the labels. Please try other labels.'))
            else:
                yield Final("", (*notes, *event.notes))

    async def _few_shot_examples(self) -> list[FewShotPair]:
        if self._few_shot is None:
            pairs = []
            for example in self.config.tasks.few_shot:
                try:
                    data = await asyncio.to_thread(read_regular_file, example.image, self.config.images.max_bytes)
                    image = await self.intake.prepare(data, example.image.name)
                except OSError as exc:
                    raise Refusal(f"The few-shot example image {example.image} can't be read ({exc.strerror}); fix [[tasks.few_shot]].") from None
                except (NotARegularFile, FileTooLarge, ImageRejected) as reason:
                    raise Refusal(f"The few-shot example image {example.image} can't be used ({reason}); fix [[tasks.few_shot]].") from None
                pairs.append(FewShotPair(await self.intake.store.put_image(image), example.text))
            self._few_shot = pairs
        return self._few_shot
