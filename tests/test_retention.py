"""What the state forgets, on both stores: a reset takes the images only its conversation used, a
person can be forgotten everywhere, and a prune deletes old turns and the images nothing refers to
after their grace period, with several processes on one database. Time is moved by back-dating what
the stores keep (file times for SQLite's image files, the rows' times in PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import asyncpg
import pytest
from PIL import Image

from bot.core.retention import kept_images, prune
from bot.images.attachments import ImageIntake
from bot.state.postgres import PostgresStore
from bot.state.store import SQLiteStore, Store, StoreError
from ground.conversation import Author, ConversationKey, ImageRef, Turn
from ground.images import ModelImage
from tests.conftest import BOTH_FAMILIES, image_bytes, write_config
from tests.test_cli import idefics_bot

ANN, BOB = Author("U1", "Ann"), Author("U2", "Bob")
HOUR = 3600.0


def picture(color: tuple[int, int, int]) -> ModelImage:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "JPEG")
    data = buffer.getvalue()
    return ModelImage(hashlib.sha256(data).hexdigest(), data, f"{color}.jpg")


RED, GREEN, BLUE = picture((255, 0, 0)), picture((0, 255, 0)), picture((0, 0, 255))


@pytest.fixture(params=["sqlite", "postgresql"])
async def open_store(request, tmp_path) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Opens stores on one state (separate processes' views, for PostgreSQL); closes them at the end."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    async with AsyncExitStack() as stack:

        async def open_one() -> Store:
            store: Store = await PostgresStore.open(url) if url else await SQLiteStore.open(tmp_path / "state" / "bot.sqlite3")
            stack.push_async_callback(store.close)
            return store

        yield open_one


async def age(store: Store, seconds: float) -> None:
    """Make everything the store holds `seconds` older."""
    if isinstance(store, SQLiteStore):
        for path in store.images_dir.glob("??/*.jpg"):
            stamp = path.stat().st_mtime - seconds
            os.utime(path, (stamp, stamp))
        db = sqlite3.connect(store.path)
        db.execute("UPDATE turns SET created = created - ?", (seconds,))
        db.commit()
        db.close()
    else:
        connection = await asyncpg.connect(store._url)
        await connection.execute("UPDATE images SET created = created - make_interval(secs => $1)", seconds)
        await connection.execute("UPDATE turns SET created = created - make_interval(secs => $1)", seconds)
        await connection.close()


async def say(store: Store, key: ConversationKey, author: Author, *images: ModelImage) -> None:
    refs = [await store.put_image(image) for image in images]
    await store.add_turn(key, Turn("user", ("look", *refs), author))
    await store.add_turn(key, Turn("assistant", ("I see.",)))


async def has(store: Store, image: ModelImage) -> bool:
    try:
        await store.get_image(ImageRef(image.digest, image.name))
        return True
    except StoreError:
        return False


async def test_a_reset_deletes_the_images_only_its_conversation_used(open_store):
    store = await open_store()
    first, second = ConversationKey("slack", "C1", "1"), ConversationKey("slack", "C1", "2")
    await say(store, first, ANN, RED, GREEN)
    await say(store, second, BOB, GREEN)
    await age(store, HOUR)
    assert await store.reset(first) == 2
    assert not await has(store, RED) and await has(store, GREEN)  # the other conversation still shows GREEN
    assert await store.load_turns(second) != []


async def test_a_person_is_forgotten_everywhere_with_the_images_only_they_sent(open_store):
    store = await open_store()
    shared, dm = ConversationKey("slack", "C1", "1"), ConversationKey("slack", "D1")
    await say(store, shared, ANN, RED, BLUE)
    await say(store, shared, BOB, BLUE)
    await say(store, dm, ANN, GREEN)
    await store.remember_image("slack", "C1", ImageRef(RED.digest, RED.name))
    await age(store, HOUR)
    gone = await store.forget_author("slack", ANN.id)
    assert (gone.turns, gone.images, gone.image_bytes) == (4, 2, len(RED.data) + len(GREEN.data))
    left = await store.load_turns(shared)
    assert [(turn.role, turn.author) for turn in left] == [("user", BOB), ("assistant", None)]
    assert await store.load_turns(dm) == []
    assert await has(store, BLUE) and not await has(store, RED) and not await has(store, GREEN)
    assert await store.last_image("slack", "C1") is None  # the channel's last image was Ann's


async def test_a_prune_deletes_old_turns_and_images_nothing_refers_to_after_their_grace(open_store):
    store = await open_store()
    old, new = ConversationKey("slack", "C1", "1"), ConversationKey("slack", "C2", "2")
    await say(store, old, ANN, RED)
    await store.put_image(BLUE)  # a few-shot example, say
    await age(store, 40 * 86400)
    await say(store, new, BOB, GREEN)
    await store.put_image(picture((9, 9, 9)))  # just stored, for a turn not stored yet
    before = time.time() - 30 * 86400
    dry = await store.prune(before, frozenset({BLUE.digest}), grace_s=HOUR, dry_run=True)
    assert (dry.turns, dry.digests) == (2, (RED.digest,))
    assert await has(store, RED) and len(await store.load_turns(old)) == 2  # a dry run deletes nothing
    gone = await store.prune(before, frozenset({BLUE.digest}), grace_s=HOUR)
    assert (gone.turns, gone.images) == (2, 1)
    assert not await has(store, RED) and await has(store, BLUE) and await has(store, GREEN) and await has(store, picture((9, 9, 9)))
    assert await store.load_turns(old) == [] and len(await store.load_turns(new)) == 2


async def test_an_image_stored_again_by_another_process_survives_a_prune(open_store):
    pruning, answering = await open_store(), await open_store()
    await answering.put_image(RED)
    await age(answering, 2 * HOUR)
    await answering.put_image(RED)  # another message shows it again: it is fresh once more
    gone = await pruning.prune(None, frozenset(), grace_s=HOUR)
    assert gone.images == 0 and await has(answering, RED)
    await age(answering, 2 * HOUR)
    assert (await pruning.prune(None, frozenset(), grace_s=HOUR)).images == 1 and not await has(answering, RED)


def test_the_prune_command_says_what_would_go_then_deletes_it(tmp_path):
    state = tmp_path / "state" / "bot.sqlite3"

    async def prepare() -> None:
        store = await SQLiteStore.open(state)
        await say(store, ConversationKey("slack", "C1", "1"), ANN, RED)
        await store.put_image(GREEN)  # nothing refers to it
        await age(store, 100 * 86400)
        await store.close()

    asyncio.run(prepare())
    (tmp_path / "config.toml").write_text(f'[state]\npath = "{state}"\nretention_days = 90\n')
    dry = idefics_bot("prune", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "Would delete 2 turns older than 90 days and 2 images nothing refers to" in dry.stdout
    assert f"  image {RED.digest}" in dry.stdout and f"  image {GREEN.digest}" in dry.stdout
    done = idefics_bot("prune", cwd=tmp_path)
    assert done.returncode == 0 and "Deleted 2 turns older than 90 days and 2 images" in done.stdout
    again = idefics_bot("prune", cwd=tmp_path)
    assert "Deleted 0 turns older than 90 days and 0 images" in again.stdout


@BOTH_FAMILIES
async def test_a_few_shot_image_stays_stored_as_the_model_prepared_it(tmp_path, tiny_checkpoint, backend):
    """The intake stores a few-shot image at the model's image size (IDEFICS v1's square, Idefics3's
    longest edge), not the 224-pixel default: a prune keeps that one past its grace, in the running
    bot and in `idefics-bot prune`, which loads no model."""
    example = tmp_path / "example.png"
    example.write_bytes(image_bytes(size=(300, 200)))
    state = tmp_path / "state" / "bot.sqlite3"
    config = write_config(
        tmp_path / "config.toml",
        f"""
[model]
checkpoint = "{tiny_checkpoint}"
[state]
path = "{state}"
[[tasks.few_shot]]
image = "{example}"
text = "A red rectangle."
""",
    )
    store = await SQLiteStore.open(config.state.path)
    try:
        stored = await ImageIntake(config.images, store, backend).prepare(example.read_bytes(), example.name)
        await store.put_image(stored)
        await store.put_image(RED)  # nothing refers to it
        await age(store, 2 * HOUR)
    finally:
        await store.close()
    pruned = await asyncio.to_thread(idefics_bot, "prune", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    assert "and 1 images nothing refers to" in pruned.stdout
    store = await SQLiteStore.open(config.state.path)
    try:
        assert await has(store, stored) and not await has(store, RED)
        assert await kept_images(config, (backend.info,)) == {stored.digest}
        await age(store, 2 * HOUR)
        assert (await prune(config, store, (backend.info,))).images == 0 and await has(store, stored)
    finally:
        await store.close()


@pytest.mark.parametrize("forgetting", ["reset", "forget", "prune"])
async def test_nothing_of_a_forgotten_turn_stays_in_any_file_of_the_state_folder(tmp_path, forgetting):
    """SQLite keeps the pages a delete changed, as they were, in its -wal file until a checkpoint: a
    forgotten question would stay readable there (and in free pages) while the bot runs."""
    store = await SQLiteStore.open(tmp_path / "state" / "bot.sqlite3")
    try:
        marker = "forget-me-" + "7" * 12
        kept, gone = ConversationKey("slack", "C1", "keep"), ConversationKey("slack", "C1", "gone")
        await store.add_turn(kept, Turn("user", ("nothing to hide",), BOB))
        for number in range(30):
            await store.add_turn(gone, Turn("user", (f"{marker} question {number}",), ANN))
            await store.add_turn(gone, Turn("assistant", (f"{marker} answer {number}",)))
        if forgetting == "prune":
            await age(store, 40 * 86400)
            await store.add_turn(kept, Turn("assistant", ("still here",)))
        found = [path for path in (tmp_path / "state").rglob("*") if path.is_file() and marker.encode() in path.read_bytes()]
        assert found  # the test looks where the text is
        if forgetting == "reset":
            assert await store.reset(gone) == 60
        elif forgetting == "forget":
            assert (await store.forget_author("slack", ANN.id)).turns == 60
        else:
            assert (await store.prune(time.time() - 30 * 86400, frozenset(), grace_s=HOUR)).turns == 61
        left = {path.name: path.read_bytes().count(marker.encode()) for path in (tmp_path / "state").rglob("*") if path.is_file()}
        assert not any(left.values()), left
        assert [turn.text for turn in await store.load_turns(kept)][-1] in ("nothing to hide", "still here")
    finally:
        await store.close()


async def test_one_forgetting_after_another_leaves_the_store_writable(tmp_path):
    """The checkpoint after a delete answers with a row: left unread, its statement stays open and the
    next transaction can't commit ("SQL statements in progress")."""
    store = await SQLiteStore.open(tmp_path / "state" / "bot.sqlite3")
    try:
        key = ConversationKey("slack", "C1", "T1")
        for _ in range(3):
            await store.add_turn(key, Turn("user", ("a question",), ANN))
            await store.add_turn(key, Turn("assistant", ("an answer",)))
            assert await store.reset(key) == 2
            assert (await store.forget_author("slack", ANN.id)).turns == 0
    finally:
        await store.close()
