"""Answering after a hard stop: the store finds the user turns a killed process never answered (both
stores), one process adopts each, and the engine answers such a turn once, in place, without adding a
new one."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bot.core.engine import Engine
from bot.runtime.app import Runtime
from bot.sdk.delivery import LiveReply
from bot.state.postgres import PostgresStore
from ground.conversation import Author, ConversationKey, ImageRef, Turn, Unanswered
from ground.messages import Final, IncomingMessage
from tests.bots import logged
from tests.test_delivery import RecordingSurface
from tests.test_store import new_store  # noqa: F401 (fixtures: SQLite and PostgreSQL)
from tests.test_store import store as store

ANN = Author("u1", "Ann")
KILLED = "a-process-that-was-killed"  # the answerer of a question left unanswered: no lease, no holds


async def test_the_store_finds_conversations_whose_last_turn_was_never_answered(store):
    answered, left, elsewhere = ConversationKey("discord", "c1", "t1"), ConversationKey("discord", "c2"), ConversationKey("slack", "C1", "1.2")
    overtaken, in_hand = ConversationKey("discord", "c3"), ConversationKey("discord", "c4")
    await store.add_turn(answered, Turn("user", ("hi",), ANN, "m1"), answerer=KILLED)
    await store.add_turn(answered, Turn("assistant", ("hello",)))
    await store.add_turn(left, Turn("user", ("first",), ANN, "m2"), answerer=KILLED)
    await store.add_turn(left, Turn("assistant", ("one",)))
    question = await store.add_turn(left, Turn("user", ("look", ImageRef("a" * 64, "cat.png")), ANN, "m3"), answerer=KILLED)
    await store.record_reply("discord", "m3", ["r1", "r2"])
    await store.add_turn(elsewhere, Turn("user", ("other platform",), ANN, "m4"), answerer=KILLED)
    await store.add_turn(overtaken, Turn("user", ("nobody answers this one",), ANN, "m5"))  # a newer message overtook it
    await store.add_turn(in_hand, Turn("user", ("being answered",), ANN, "m6"), answerer=store.process_id)

    [found] = await store.unanswered("discord", since=time.time() - 60)
    assert found == Unanswered(left, Turn("user", ("look", ImageRef("a" * 64, "cat.png")), ANN, "m3"), KILLED, ("r1", "r2"))
    assert found.turn.id == question.id
    assert await store.unanswered("discord", since=time.time() + 60) == []  # too old to answer now


async def test_one_process_adopts_a_question_however_many_try(new_store):  # noqa: F811
    stores = [await new_store() for _ in range(3)]
    try:
        key = ConversationKey("slack", "C1", "1.1")
        await stores[0].add_turn(key, Turn("user", ("hello?",), ANN, "1.1"), answerer=KILLED)
        found = await stores[0].unanswered("slack", since=time.time() - 60)
        assert len(found) == 1
        assert sorted(await asyncio.gather(*(each.adopt(found[0]) for each in stores))) == [False, False, True]
        assert await stores[0].adopt(found[0]) is False
    finally:
        for each in stores:
            await each.close()


async def test_a_stranded_question_is_found_whatever_came_after_it_until_it_is_answered(new_store):  # noqa: F811
    key = ConversationKey("slack", "C1", "1.1")
    first = await new_store()
    try:
        stranded = await first.add_turn(key, Turn("user", ("first",), ANN, "1.1"), answerer=KILLED)
        follow_up = await first.add_turn(key, Turn("user", ("second",), ANN, "1.2"), answerer=first.process_id)
        await first.add_turn(key, Turn("assistant", ("two",)), answers=follow_up.id)  # a follow-up that didn't wait for it
        [found] = await first.unanswered("slack", since=time.time() - 60)
        assert found.turn.id == stranded.id and await first.adopt(found)
        await first.add_turn(key, Turn("assistant", ("one",)), answers=stranded.id)  # answered late, after the others
    finally:
        await first.close()
    after = await new_store()  # another process, or this one restarted: nothing is left
    try:
        assert await after.unanswered("slack", since=time.time() - 60) == []
    finally:
        await after.close()


async def test_a_question_is_found_once_its_process_has_neither_a_lease_nor_a_hold(postgres_url):
    """PostgreSQL: a question stays with the process answering it while that process renews its lease
    or holds the conversation (a stalled process whose lease ran out still holds it)."""
    mine, theirs = await PostgresStore.open(postgres_url), await PostgresStore.open(postgres_url, lease_s=600)  # no renewal during the test
    try:
        key = ConversationKey("slack", "C1", "1.1")
        async with theirs.hold_conversation(key):
            await theirs.add_turn(key, Turn("user", ("hello?",), ANN, "1.1"), answerer=theirs.process_id)
            assert await mine.unanswered("slack", since=time.time() - 60) == []  # its lease is fresh
            connection = await asyncpg.connect(postgres_url)
            try:
                await connection.execute("UPDATE processes SET seen = now() - interval '1 hour' WHERE id = $1", theirs.process_id)
            finally:
                await connection.close()
            assert await mine.unanswered("slack", since=time.time() - 60) == []  # it still holds the conversation
        [found] = await mine.unanswered("slack", since=time.time() - 60)
        assert found.answerer == theirs.process_id
    finally:
        await theirs.close()
        await mine.close()


async def test_a_turn_left_unanswered_is_answered_once_in_its_conversation(config):
    key = ConversationKey("test", "c1", "t1")
    async with Runtime.open(config) as runtime:
        store, engine = runtime.store, runtime.engine
        await store.add_turn(key, Turn("user", ("hello",), ANN, "m1"))
        await store.add_turn(key, Turn("assistant", ("hi there",)))
        await store.add_turn(key, Turn("user", ("and now?",), ANN, "m2"), answerer=KILLED)  # killed while answering this

        [pending] = await engine.unanswered("test")
        events = [event async for event in engine.resume(pending, shared=True)]
        final = events[-1]
        assert final.text and final.notes == ("I was restarted while writing this answer, so it comes late.",)
        turns = await store.load_turns(key)
        assert [turn.role for turn in turns] == ["user", "assistant", "user", "assistant"] and turns[-1].text == final.text
        assert await engine.unanswered("test") == []
        # Resumed again (by a second process, say): the conversation moved on, so nothing is said.
        assert [event async for event in engine.resume(pending, shared=True)] == [Final("")]
        assert len(await store.load_turns(key)) == 4

        await store.add_turn(key, Turn("user", ("one more",), ANN, "m3"), answerer=KILLED)
        off = config.model_copy(update={"bot": config.bot.model_copy(update={"resume_window_s": 0})})
        assert await Engine(off, runtime.model, store, runtime.metrics).unanswered("test") == []


async def test_a_process_that_does_not_adopt_a_question_leaves_it_and_its_messages_alone(config):
    key = ConversationKey("test", "c1", "t1")
    async with Runtime.open(config) as runtime:
        store, engine = runtime.store, runtime.engine
        await store.add_turn(key, Turn("user", ("and now?",), ANN, "m1"), answerer=KILLED)
        [pending] = await engine.unanswered("test")
        assert await store.adopt(pending)  # another process took it over first
        surface = RecordingSurface()
        surface.messages = ["Half an answer"]  # what the killed process had posted
        final = await LiveReply(surface, limit=2000, messages=[0]).run(engine.resume(pending, shared=True))
        assert final == Final("") and surface.messages == ["Half an answer"] and surface.calls == []
        assert [turn.role for turn in await store.load_turns(key)] == ["user"]  # left to the process that adopted it


async def test_a_follow_up_that_takes_the_conversation_first_waits_for_the_stranded_question_before_it(config):
    # One process on SQLite, after a restart: a follow-up gets the conversation before the question
    # the killed process left is taken up; it steps aside until that one is answered.
    config = config.model_copy(update={"bot": config.bot.model_copy(update={"adopt_after_s": 1.0})})
    key = ConversationKey("test", "c1", "t1")
    async with Runtime.open(config) as runtime:
        store, engine = runtime.store, runtime.engine
        await store.add_turn(key, Turn("user", ("first question",), ANN, "m1"), answerer=KILLED)
        [pending] = await engine.unanswered("test")
        with logged("bot.core.turns") as logs:
            follow_up = asyncio.create_task(_finals(engine.reply(IncomingMessage(key, ANN, "and a follow-up", message_id="m2"))))
            await logs.wait_for(lambda records: any(r.msg == "turn.waiting_for_stranded" for r in records))
            adopted = await _finals(engine.resume(pending, shared=False))
            answered = await follow_up
        turns = await store.load_turns(key)
    assert adopted.text and answered.text
    assert [(turn.role, turn.text) for turn in turns] == [
        ("user", "first question"), ("assistant", adopted.text), ("user", "and a follow-up"), ("assistant", answered.text)
    ]  # fmt: skip


async def _finals(events) -> Final:
    return [event async for event in events][-1]
