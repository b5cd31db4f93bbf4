"""Fair sharing: per-user token buckets, turn-taking within a conversation, and "latest" mode."""

from __future__ import annotations

import asyncio
import re

from bot.core.turns import Arrivals
from bot.runtime.app import Runtime
from bot.state.lock import ConversationLocks
from bot.state.rates import RateLimiter
from ground.conversation import Author, ConversationKey
from ground.messages import IncomingMessage

KEY = ConversationKey("test", "c1", "t1")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=3, clock=clock)
    assert [limiter.acquire("ann") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("ann") == 10.0  # one request per 10 s
    assert limiter.acquire("bob") == 0  # others are not affected
    clock.now += 10
    assert limiter.acquire("ann") == 0
    assert limiter.acquire("ann") == 10.0


def test_idle_buckets_are_forgotten():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=2, clock=clock)
    for user in range(2000):
        limiter.acquire(user)
        clock.now += 0.01
    clock.now += 10
    for _ in range(1024):
        limiter.acquire("active")
    assert len(limiter._buckets) < 50


async def test_turns_go_in_arrival_order():
    locks = ConversationLocks()
    order = []

    async def request(n):
        async with locks.hold(KEY):
            order.append(n)
            await asyncio.sleep(0)

    await asyncio.gather(*(request(n) for n in range(5)))
    assert order == [0, 1, 2, 3, 4]
    assert not locks._locks  # nothing kept once a conversation is quiet


async def test_a_waiting_message_learns_a_newer_one_overtook_it():
    locks, arrivals = ConversationLocks(), Arrivals()
    seen = []
    first_inside = asyncio.Event()
    release = asyncio.Event()

    async def request(n):
        with arrivals.arriving(KEY) as overtaken:
            async with locks.hold(KEY):
                seen.append((n, overtaken()))
                if n == 0:
                    first_inside.set()
                    await release.wait()

    first = asyncio.create_task(request(0))
    await first_inside.wait()
    waiting = [asyncio.create_task(request(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *waiting)
    assert seen == [(0, False), (1, True), (2, True), (3, False)]
    assert not arrivals._arrived  # nothing kept once a conversation is quiet


async def test_the_engine_tells_a_fast_sender_when_to_come_back(config):
    limited = config.model_copy(update={"limits": config.limits.model_copy(update={"per_user_per_minute": 2, "per_user_burst": 2})})
    async with Runtime.open(limited) as runtime:
        results = []
        for n in range(3):
            events = [event async for event in runtime.engine.reply(IncomingMessage(KEY, Author("u1", "Ann"), f"message {n}"))]
            results.append(events[-1])
        other = [event async for event in runtime.engine.reply(IncomingMessage(KEY, Author("u2", "Bob"), "me too"))][-1]
    assert results[0].text and results[1].text
    # Two per minute: the third request waits for the bucket to refill, about 30 s less the time
    # the first two took.
    assert results[2].text == ""
    wait = re.fullmatch(r"You're sending requests faster than I can answer. Please try again in (\d+) s.", results[2].notes[0])
    assert wait and 1 <= int(wait.group(1)) <= 30
    assert other.text


async def test_latest_mode_answers_the_newest_waiting_message(config, tiny_checkpoint):
    from ground.messages import Partial
    from model.loading import CheckpointSettings
    from model.local import LocalBackend
    from tests.test_model_service import Script

    latest = config.model_copy(update={"limits": config.limits.model_copy(update={"conversation_mode": "latest"})})
    backend = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint)))
    async with Runtime.open(latest, model=backend) as runtime:
        tokenizer = backend._tokenizer
        backend.row_processors.append(Script(ban=(tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id)))
        ann = Author("u1", "Ann")
        answering = asyncio.Event()

        async def ask(text):
            events = []
            async for event in runtime.engine.reply(IncomingMessage(KEY, ann, text)):
                events.append(event)
                if isinstance(event, Partial):
                    answering.set()
            return events[-1]

        first = asyncio.create_task(ask("first"))
        await answering.wait()
        second, third = asyncio.create_task(ask("second")), asyncio.create_task(ask("third"))
        results = await asyncio.gather(first, second, third)
        turns = await runtime.store.load_turns(KEY)
    assert results[0].text and results[2].text
    assert results[1].text == "" and "A newer message arrived" in results[1].notes[0]
    assert [(turn.role, turn.text if turn.role == "user" else "") for turn in turns] == [
        ("user", "first"), ("assistant", ""), ("user", "second"), ("user", "third"), ("assistant", ""),
    ]
