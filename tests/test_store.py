"""The SQLite store: conversations survive a restart, reset forgets, bad files give clear errors."""

from __future__ import annotations

import sqlite3

import pytest

from bot.conversation import Author, ConversationKey, ImageRef, Turn
from bot.images import prepare_image
from bot.store import SCHEMA_VERSION, SQLiteStore, StoreError
from tests.conftest import image_bytes

KEY = ConversationKey("discord", "c1", "t1")
OTHER = ConversationKey("discord", "c1", "t2")


@pytest.fixture
async def store(tmp_path):
    opened = SQLiteStore(tmp_path / "state" / "bot.sqlite3")
    await opened.open()
    yield opened
    await opened.close()


async def test_turns_and_images_survive_a_restart(tmp_path):
    path = tmp_path / "bot.sqlite3"
    first = SQLiteStore(path)
    await first.open()
    image = prepare_image(image_bytes(), "cat.png")
    ref = await first.put_image(image)
    await first.add_turn(KEY, Turn("user", ("What is this?", ref), Author("u1", "Ann"), message_id="m1"))
    await first.add_turn(KEY, Turn("assistant", ("A cat.",), dropped=2))
    await first.link_message("discord", "m2", KEY)
    await first.close()

    second = SQLiteStore(path)
    await second.open()
    try:
        turns = await second.load_turns(KEY)
        assert turns == [
            Turn("user", ("What is this?", ImageRef(image.digest, "cat.png")), Author("u1", "Ann"), "m1"),
            Turn("assistant", ("A cat.",), dropped=2),
        ]
        assert all(turn.id is not None for turn in turns)
        assert (await second.get_image(ref)).data == image.data
        assert await second.conversation_of("discord", "m2") == KEY
        assert await second.load_turns(OTHER) == []
    finally:
        await second.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_reset_clears_one_conversation(store):
    await store.add_turn(KEY, Turn("user", ("a",), Author("u", "U")))
    await store.add_turn(OTHER, Turn("user", ("b",), Author("u", "U")))
    assert await store.reset(KEY) == 1
    assert not await store.has_conversation(KEY)
    assert await store.has_conversation(OTHER)
    assert await store.reset(ConversationKey("x", "y")) == 0


async def test_load_returns_the_newest_turns_oldest_first(store):
    for n in range(10):
        await store.add_turn(KEY, Turn("user", (str(n),), Author("u", "U")))
    assert [turn.text for turn in await store.load_turns(KEY, limit=3)] == ["7", "8", "9"]


async def test_remove_turn(store):
    kept = await store.add_turn(KEY, Turn("user", ("keep",), Author("u", "U")))
    gone = await store.add_turn(KEY, Turn("user", ("gone",), Author("u", "U")))
    await store.remove_turn(gone.id)
    assert await store.load_turns(KEY) == [kept]


async def test_events_are_claimed_once(store):
    assert await store.claim_event("slack", "Ev1")
    assert not await store.claim_event("slack", "Ev1")
    assert await store.claim_event("discord", "Ev1")


async def test_last_image_of_a_channel(store):
    assert await store.last_image("slack", "C1") is None
    await store.remember_image("slack", "C1", ImageRef("a" * 64, "one.png"))
    await store.remember_image("slack", "C1", ImageRef("b" * 64, "two.png"))
    assert await store.last_image("slack", "C1") == ImageRef("b" * 64, "two.png")


async def test_a_missing_image_file_is_a_clear_error(store):
    with pytest.raises(StoreError, match="missing"):
        await store.get_image(ImageRef("c" * 64, "lost.png"))


async def test_a_corrupt_state_file_is_a_clear_start_up_error(tmp_path):
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=rf"The state file {path} is not a readable idefics-bot database .*Move it aside"):
        await SQLiteStore(path).open()


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "bot.sqlite3"
    sqlite3.connect(path).execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer idefics-bot"):
        await SQLiteStore(path).open()


WRITER = """
import asyncio, sys
from bot.conversation import Author, ConversationKey, Turn
from bot.images import prepare_image
from bot.store import SQLiteStore
from tests.conftest import image_bytes

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    key = ConversationKey("test", "kill")
    for n in range(100000):
        image = await store.put_image(prepare_image(image_bytes((n % 256, 0, 0)), f"{n}.png"))
        await store.add_turn(key, Turn("user", (f"turn {n}", image), Author("u", "U")))
        print(n, flush=True)

asyncio.run(main())
"""


async def test_killing_the_process_mid_write_leaves_a_consistent_store(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "bot.sqlite3"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent
    )
    last = -1
    for line in writer.stdout:
        last = int(line)
        if last >= 40:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    reopened = SQLiteStore(path)
    await reopened.open()
    try:
        turns = await reopened.load_turns(ConversationKey("test", "kill"), limit=100000)
        assert last + 1 <= len(turns) <= last + 2  # every acknowledged write is there, at most one more
        assert [turn.text for turn in turns] == [f"turn {n}" for n in range(len(turns))]
        for turn in turns:
            assert (await reopened.get_image(turn.images[0])).data  # every image a turn names is on disk
    finally:
        await reopened.close()
