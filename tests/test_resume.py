"""Answering after a hard stop: the store finds the user turns a killed process never answered (both
stores), and the engine answers such a turn once, in place, without adding a new one."""

from __future__ import annotations

import time

from bot.runtime.app import Runtime
from bot.core.conversation import Author, ConversationKey, ImageRef, Turn, Unanswered
from bot.core.engine import Engine
from bot.core.messages import Final
from tests.test_store import new_store, store  # noqa: F401 (fixtures: SQLite and PostgreSQL)

ANN = Author("u1", "Ann")


async def test_the_store_finds_conversations_whose_last_turn_was_never_answered(store):
    answered, left, elsewhere = ConversationKey("discord", "c1", "t1"), ConversationKey("discord", "c2"), ConversationKey("slack", "C1", "1.2")
    await store.add_turn(answered, Turn("user", ("hi",), ANN, "m1"))
    await store.add_turn(answered, Turn("assistant", ("hello",)))
    await store.add_turn(left, Turn("user", ("first",), ANN, "m2"))
    await store.add_turn(left, Turn("assistant", ("one",)))
    question = await store.add_turn(left, Turn("user", ("look", ImageRef("a" * 64, "cat.png")), ANN, "m3"))
    await store.add_turn(elsewhere, Turn("user", ("other platform",), ANN, "m4"))

    [found] = await store.unanswered("discord", since=time.time() - 60)
    assert found == Unanswered(left, Turn("user", ("look", ImageRef("a" * 64, "cat.png")), ANN, "m3"))
    assert found.turn.id == question.id
    assert await store.unanswered("discord", since=time.time() + 60) == []  # too old to answer now


async def test_a_turn_left_unanswered_is_answered_once_in_its_conversation(config):
    key = ConversationKey("test", "c1", "t1")
    async with Runtime(config) as runtime:
        store, engine = runtime.store, runtime.engine
        await store.add_turn(key, Turn("user", ("hello",), ANN, "m1"))
        await store.add_turn(key, Turn("assistant", ("hi there",)))
        await store.add_turn(key, Turn("user", ("and now?",), ANN, "m2"))  # the process was killed while answering this

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

        await store.add_turn(key, Turn("user", ("one more",), ANN, "m3"))
        off = config.model_copy(update={"bot": config.bot.model_copy(update={"resume_window_s": 0})})
        assert await Engine(off, runtime.model, store, runtime.metrics).unanswered("test") == []
