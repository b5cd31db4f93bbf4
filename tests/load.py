"""The load scenario: many conversations at once on Discord and Slack, answered by one bot process
(`run_bot` with both platforms on one model service), with the tiny checkpoint. Used by
tests/test_load.py (which checks the outcome) and benchmarks/load.py (which reports the figures).

Each conversation starts with a mention and continues in its thread without one; conversations run
concurrently, and within one the messages are sent back to back, without waiting for answers. A
`ModelTap` makes each reply name the message it answers (the last `q<c>x<k>` in the model's input
becomes `r<c>x<k>.`), so the fakes show which message each reply answers.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import statistics
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from bot.runtime.config import load_config
from bot.state.store import SQLiteStore
from ground.conversation import ConversationKey, Turn
from tests.bots import BotRun, Harness, discord_connected, discord_section, logged, slack_failures, slack_section, slack_started, thread_of
from tests.fake_discord import FakeDiscord
from tests.fake_slack import FakeSlack
from tests.model_tap import ModelTap, tapping

QUESTION = re.compile(r"q(\d+)x(\d+)")
ANSWER = re.compile(r"r\d+x\d+\.")
SLACK_CHANNEL = "C0000001"

CONFIG = """
[bot]
shutdown_grace_s = 30.0
[model]
checkpoint = "{checkpoint}"
max_batch_size = {max_batch_size}
max_queue = 256
[generation]
max_new_tokens = 12
[conversation]
system_prompt = ""
[limits]
per_user_per_minute = 0
[state]
path = "{state}"
"""


def question(conversation: int, number: int) -> str:
    return f"q{conversation}x{number}"


def photo_of(conversation: int) -> bytes:
    """A 256x256 photo-like (noisy) PNG of its own for each conversation."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (256, 256), random.Random(conversation).randbytes(256 * 256 * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def answer_to(prompt: str) -> str:
    """The reply the tap makes the model give: it names the newest question in the prompt."""
    conversation, number = QUESTION.findall(prompt)[-1]
    return f"r{conversation}x{number}."


@dataclass
class Conversation:
    """One conversation of the scenario and what happened in it."""

    number: int
    platform: str
    key: ConversationKey | None = None
    sent: list[float] = field(default_factory=list)  # when each message was delivered to the bot
    answered: dict[str, float] = field(default_factory=dict)  # bot message id -> when it first showed a final answer
    answers: list[str] = field(default_factory=list)  # the bot's messages in the thread, in order, as last shown
    turns: list[Turn] = field(default_factory=list)  # as stored, after the run

    def expected(self, messages: int) -> list[str]:
        return [answer_to(question(self.number, k)) for k in range(1, messages + 1)]


@dataclass
class LoadResult:
    """What the measured round showed."""

    conversations: list[Conversation]
    messages: int  # per conversation
    seconds: float  # from the first message sent to the last answer shown
    batch_sizes: list[int]  # of every generate call during the load
    rss_growth: int  # bytes of resident memory gained from after the warm-up to the last answer
    stray: list[str]  # what the bot posted outside the conversations' threads
    failures: list  # errors logged, Slack API calls that failed

    @property
    def total(self) -> int:
        return len(self.conversations) * self.messages

    def latencies(self) -> list[float]:
        """Seconds from sending each message to its answer showing, for every answered message."""
        found = []
        for conversation in self.conversations:
            shown = sorted(conversation.answered.values())
            found += [answer - sent for sent, answer in zip(conversation.sent, shown)]
        return found

    def problems(self) -> list[str]:
        """Everything that went wrong: unanswered, duplicated or out-of-order answers, lost turns."""
        found = []
        for conversation in self.conversations:
            expected = conversation.expected(self.messages)
            name = f"{conversation.platform} conversation {conversation.number}"
            if conversation.answers != expected:
                found.append(f"{name}: answers {conversation.answers}, expected {expected}")
            stored = [(turn.role, turn.text) for turn in conversation.turns]
            wanted = [pair for k, answer in enumerate(expected, 1) for pair in (("user", question(conversation.number, k)), ("assistant", answer))]
            if stored != wanted or not conversation.turns or len(conversation.turns[0].images) != 1:
                found.append(f"{name}: stored turns {conversation.turns}, expected {wanted} with the photo in the first")
        return found + [f"posted outside a thread: {text}" for text in self.stray] + [f"logged: {failure}" for failure in self.failures]

    def report(self) -> str:
        latencies = sorted(self.latencies())
        centiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
        sizes = sorted(set(self.batch_sizes))
        lines = [
            f"{self.total} messages in {len(self.conversations)} conversations (Discord and Slack at once) in {self.seconds:.1f} s",
            f"throughput: {self.total / self.seconds:.1f} messages/s",
            f"latency: p50 {centiles[49]:.2f} s, p99 {centiles[98]:.2f} s, max {latencies[-1]:.2f} s",
            f"batches: {len(self.batch_sizes)}, mean size {statistics.mean(self.batch_sizes):.1f}, sizes seen "
            + ", ".join(f"{size}×{self.batch_sizes.count(size)}" for size in sizes),
            f"resident memory growth after the warm-up: {self.rss_growth / 2**20:.1f} MB",
        ]
        return "\n".join(lines)


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Scenario:
    def __init__(self, discord: FakeDiscord, slack: Harness, messages: int):
        self.discord = discord
        self.slack = slack
        self.messages = messages

    # -- sending -----------------------------------------------------------------------------

    async def discord_conversation(self, conversation: Conversation) -> None:
        fake = self.discord
        person = fake.user(f"Person{conversation.number}")
        photo = fake.upload(f"photo{conversation.number}.png", photo_of(conversation.number), "image/png")
        first = await fake.say(person, fake.text_channel, question(conversation.number, 1), mention=True, attachments=(photo,))
        conversation.sent.append(time.perf_counter())
        thread = await thread_of(fake, first)  # the bot opens it on the first message
        conversation.key = ConversationKey("discord", fake.text_channel["id"], thread["id"])
        for k in range(2, self.messages + 1):
            await fake.say(person, thread, question(conversation.number, k))
            conversation.sent.append(time.perf_counter())

    async def slack_conversation(self, conversation: Conversation) -> None:
        slack, person = self.slack.slack, f"U{conversation.number:07d}"
        photo = slack.add_file(f"photo{conversation.number}.png", photo_of(conversation.number))
        first = slack.mention(SLACK_CHANNEL, person, question(conversation.number, 1), files=[photo])
        await self.slack.send(first)
        conversation.sent.append(time.perf_counter())
        conversation.key = ConversationKey("slack", SLACK_CHANNEL, first["ts"])
        for k in range(2, self.messages + 1):
            await self.slack.send(slack.message(SLACK_CHANNEL, person, question(conversation.number, k), thread_ts=first["ts"]))
            conversation.sent.append(time.perf_counter())

    async def round(self, numbers: range, timeout: float) -> list[Conversation]:
        """Conversations `numbers`, the first half on Discord and the rest on Slack, all at once;
        returns them once every message is answered."""
        half = numbers.start + len(numbers) // 2
        on_discord = [Conversation(n, "discord") for n in range(numbers.start, half)]
        on_slack = [Conversation(n, "slack") for n in range(half, numbers.stop)]
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                *(self.discord_conversation(c) for c in on_discord),
                *(self.slack_conversation(c) for c in on_slack),
                self.discord.wait_for(lambda: self.discord_seen(on_discord), timeout=timeout),
                self.slack.slack.calls.wait_for(lambda _: self.slack_seen(on_slack), timeout=timeout),
            )
        return on_discord + on_slack

    # -- watching the answers ----------------------------------------------------------------

    def discord_seen(self, conversations: list[Conversation]) -> bool:
        """Note the answers on the fake Discord now; True once every message has one."""
        posted: dict[str, list[tuple[str, str]]] = {}
        for message in self.discord.messages.values():  # one pass: this runs at every change of the fake
            if message["author"]["id"] == self.discord.bot["id"]:
                posted.setdefault(message["channel_id"], []).append((message["id"], message["content"]))
        return self._note(conversations, lambda key: posted.get(key.thread, []))

    def slack_seen(self, conversations: list[Conversation]) -> bool:
        """Note the answers on the fake Slack now; True once every message has one."""
        posted: dict[str | None, list[tuple[str, str]]] = {}
        for message in self.slack.slack.messages.values():
            posted.setdefault(message.thread_ts, []).append((message.ts, message.text))
        return self._note(conversations, lambda key: posted.get(key.thread, []))

    def _note(self, conversations: list[Conversation], posted_in) -> bool:
        now, done = time.perf_counter(), True
        for conversation in conversations:
            if conversation.key is None:
                done = False
                continue
            posted = posted_in(conversation.key)
            conversation.answers = [text for _, text in posted]
            for message_id, text in posted:
                if message_id not in conversation.answered and ANSWER.fullmatch(text):
                    conversation.answered[message_id] = now
            done = done and len(conversation.answered) >= self.messages
        return done


async def run_load(
    checkpoint: Path, directory: Path, *, conversations: int = 60, messages: int = 5, max_batch_size: int = 8, timeout: float = 300.0
) -> LoadResult:
    """Run the scenario: `conversations` (half on each platform) of `messages` messages each."""
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (set-up, before anything runs on the loop)
    # The tiny model's operations are too small to gain from several threads, and on a busy 2-core
    # machine torch's thread pool makes each step many times slower: one thread measures the bot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return await _run_load(checkpoint, directory, conversations, messages, max_batch_size, timeout)
    finally:
        torch.set_num_threads(threads)


async def _run_load(checkpoint: Path, directory: Path, conversations: int, messages: int, max_batch_size: int, timeout: float) -> LoadResult:
    (directory / "config.toml").write_text(CONFIG.format(checkpoint=checkpoint, max_batch_size=max_batch_size, state=directory / "state" / "bot.sqlite3"))
    config = load_config(directory / "config.toml", environ={})
    async with AsyncExitStack() as stack:
        discord = await stack.enter_async_context(FakeDiscord())
        slack = await stack.enter_async_context(FakeSlack())
        logs = stack.enter_context(logged("adapters"))
        tap = stack.enter_context(tapping(ModelTap()))
        tap.say = answer_to
        config = config.model_copy(update={"discord": discord_section(discord), "slack": slack_section(slack)})
        run = await BotRun(config).start(discord_connected(discord), slack_started(logs))
        stack.push_async_callback(run.stop)
        scenario = _Scenario(discord, Harness(slack, config, logs, tap), messages)

        # A first round just like the measured one, in conversations of its own, warms the process up:
        # caches and the memory allocator's pools grow to their size, so the measured round shows
        # what each message costs.
        await scenario.round(range(conversations, 2 * conversations), timeout)
        rss, batches, seen = resident_bytes(), len(tap.backend.batch_sizes), len(logs.items)
        started = time.perf_counter()
        measured = await scenario.round(range(conversations), timeout)
        ended = max(max(c.answered.values()) for c in measured)
        growth = resident_bytes() - rss
        batch_sizes = tap.backend.batch_sizes[batches:]
        failures = slack_failures(logs.items[seen:])
        stray = discord.bot_texts(discord.text_channel["id"]) + [message.text for message in slack.thread(SLACK_CHANNEL, None)]
        await stack.aclose()  # stops the bot (it drains first); then what it stored is read
    store = await SQLiteStore.open(directory / "state" / "bot.sqlite3")
    try:
        for conversation in measured:
            conversation.turns = await store.load_turns(conversation.key)
    finally:
        await store.close()
    return LoadResult(measured, messages, ended - started, batch_sizes, growth, stray, failures)
