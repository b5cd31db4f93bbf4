"""Both stores, SQLite and PostgreSQL (a real server): conversations survive a restart, reset forgets,
events are claimed once, one holder at a time per conversation, bad state gives clear errors."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable

import pytest

from bot.images.intake import prepare_image
from bot.state.postgres import PostgresStore
from bot.state.store import SCHEMA_VERSION, SQLiteStore, Store, StoreError
from ground.conversation import Author, ConversationKey, ImageRef, Turn
from tests.conftest import image_bytes

KEY = ConversationKey("discord", "c1", "t1")
OTHER = ConversationKey("discord", "c1", "t2")


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store(request, tmp_path) -> Callable[[], Awaitable[Store]]:
    """Opens store objects on one and the same state, as a restart (or another process) would."""
    if request.param == "sqlite":
        return lambda: SQLiteStore.open(tmp_path / "state" / "bot.sqlite3")
    url = request.getfixturevalue("postgres_url")
    return lambda: PostgresStore.open(url)


@pytest.fixture
async def store(new_store):
    opened = await new_store()
    yield opened
    await opened.close()


async def test_turns_and_images_survive_a_restart(new_store):
    first = await new_store()
    image = prepare_image(image_bytes(), "cat.png")
    ref = await first.put_image(image)
    assert await first.put_image(image) == ref  # stored once per content
    await first.add_turn(KEY, Turn("user", ("What is this?", ref), Author("u1", "Ann"), message_id="m1"))
    await first.add_turn(KEY, Turn("assistant", ("A cat.",), dropped=2))
    await first.link_message("discord", "m2", KEY)
    await first.close()

    second = await new_store()
    try:
        turns = await second.load_turns(KEY)
        assert turns == [
            Turn("user", ("What is this?", ImageRef(image.digest, "cat.png")), Author("u1", "Ann"), "m1"),
            Turn("assistant", ("A cat.",), dropped=2),
        ]
        assert all(turn.id is not None for turn in turns)
        assert (await second.get_image(ref)).data == image.data
        assert await second.conversation_of("discord", "m2") == KEY
        assert await second.conversation_of("discord", "m3") is None
        assert await second.load_turns(OTHER) == []
    finally:
        await second.close()


async def test_a_new_state_file_gets_the_current_schema(tmp_path):
    path = tmp_path / "bot.sqlite3"
    opened = await SQLiteStore.open(path)
    await opened.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_reset_clears_one_conversation(store):
    await store.add_turn(KEY, Turn("user", ("a",), Author("u", "U")))
    await store.add_turn(OTHER, Turn("user", ("b",), Author("u", "U")))
    assert await store.reset(KEY) == 1
    assert not await store.has_conversation(KEY)
    assert await store.has_conversation(OTHER)
    assert await store.reset(ConversationKey("x", "y")) == 0


async def test_the_conversations_of_a_channel(store):
    for key in (KEY, OTHER, ConversationKey("discord", "c2", "t1"), ConversationKey("slack", "c1", "t1")):
        await store.add_turn(key, Turn("user", ("a",), Author("u", "U")))
    await store.add_turn(ConversationKey("discord", "c1", "t3"), Turn("user", ("a",), Author("u", "U")))
    await store.reset(ConversationKey("discord", "c1", "t3"))
    assert await store.conversations_in("discord", "c1") == [KEY, OTHER]


async def test_load_returns_the_newest_turns_oldest_first(store):
    for n in range(10):
        await store.add_turn(KEY, Turn("user", (str(n),), Author("u", "U")))
    assert [turn.text for turn in await store.load_turns(KEY, limit=3)] == ["7", "8", "9"]


async def test_remove_turn(store):
    kept = await store.add_turn(KEY, Turn("user", ("keep",), Author("u", "U")))
    gone = await store.add_turn(KEY, Turn("user", ("gone",), Author("u", "U")))
    await store.remove_turn(gone.id)
    assert await store.load_turns(KEY) == [kept]


async def test_a_message_can_be_linked_again(store):
    await store.link_message("slack", "m1", KEY)
    await store.link_message("slack", "m1", OTHER)
    assert await store.conversation_of("slack", "m1") == OTHER


async def test_a_vote_is_kept_with_its_answer_and_the_last_vote_counts(store):
    answer = await store.add_turn(KEY, Turn("assistant", ("a dog",)))
    assert await store.record_feedback(answer.id, "slack", "U1", "up")
    assert await store.record_feedback(answer.id, "slack", "U2", "up")
    assert await store.record_feedback(answer.id, "slack", "U2", "down")
    assert await store.feedback_of(answer.id) == {"U1": "up", "U2": "down"}
    await store.reset(KEY)
    assert not await store.record_feedback(answer.id, "slack", "U3", "up")  # the answer is gone
    assert await store.feedback_of(answer.id) == {}


async def test_values_are_kept_and_replaced(store):
    assert await store.get_value("discord.commands.global") is None
    await store.set_value("discord.commands.global", "abc")
    await store.set_value("discord.commands.global", "def")
    assert await store.get_value("discord.commands.global") == "def"


async def test_events_are_claimed_once(store):
    assert await store.claim_event("slack", "Ev1")
    assert not await store.claim_event("slack", "Ev1")
    assert await store.claim_event("discord", "Ev1")


async def test_last_image_of_a_channel(store):
    assert await store.last_image("slack", "C1") is None
    await store.remember_image("slack", "C1", ImageRef("a" * 64, "one.png"))
    await store.remember_image("slack", "C1", ImageRef("b" * 64, "two.png"))
    assert await store.last_image("slack", "C1") == ImageRef("b" * 64, "two.png")
    assert await store.last_image("slack", "C2") is None


async def test_a_missing_image_is_a_clear_error(store):
    with pytest.raises(StoreError, match=r"The image lost.png \(cccccccccccc\) is missing from"):
        await store.get_image(ImageRef("c" * 64, "lost.png"))


async def test_holders_of_a_conversation_take_turns_in_arrival_order(store):
    entered: list[int] = []
    first_in, let_go = asyncio.Event(), asyncio.Event()

    async def hold(n: int) -> None:
        async with store.hold_conversation(KEY):
            entered.append(n)
            if n == 0:
                first_in.set()
                await let_go.wait()
            assert entered[-1] == n  # nobody else got in meanwhile

    holders = [asyncio.create_task(hold(0))]
    await first_in.wait()
    holders += [asyncio.create_task(hold(n)) for n in (1, 2, 3)]
    async with asyncio.timeout(10):
        async with store.hold_conversation(OTHER):  # another conversation doesn't wait
            assert entered == [0]
    let_go.set()
    async with asyncio.timeout(10):
        await asyncio.gather(*holders)
    assert entered == [0, 1, 2, 3]


async def test_a_cancelled_holder_lets_the_next_one_in(store):
    inside = asyncio.Event()

    async def hold_forever() -> None:
        async with store.hold_conversation(KEY):
            inside.set()
            await asyncio.Event().wait()

    holder = asyncio.create_task(hold_forever())
    await inside.wait()
    holder.cancel()
    async with asyncio.timeout(10):
        async with store.hold_conversation(KEY):
            pass


async def test_a_corrupt_state_file_is_a_clear_start_up_error(tmp_path):
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=rf"The state file {path} is not a readable idefics-bot database .*Move it aside"):
        await SQLiteStore.open(path)


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "bot.sqlite3"
    sqlite3.connect(path).execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer idefics-bot"):
        await SQLiteStore.open(path)
