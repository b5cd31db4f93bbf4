"""Where conversations live between messages and across restarts.

`Store` is the interface; `SQLiteStore` is the default: one SQLite file (WAL, one transaction per
change, a versioned schema) and the images beside it as files named by their content hash.
All SQLite and file work runs on one dedicated thread, never on the event loop. SQLite state belongs
to one process; state that several processes share lives in PostgreSQL (`bot.state.postgres`).
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import sqlite3
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bot.state.lock import ConversationLocks
from bot.state.rates import RateLimiter, RequestBuckets
from bot.state.schema import migrations
from ground.conversation import Author, ConversationKey, ImageRef, Part, Turn, Unanswered
from ground.images import ModelImage


class StoreError(Exception):
    """The state can't be opened or used; the message names the file and what to do."""


class StoreUnavailable(StoreError):
    """The state can't be written (or read) right now: a full disk, an I/O error. The bot goes on
    serving; the message says what failed, for the admin's log."""


class Store(abc.ABC):
    """Conversations, their turns and images, and the small memories the adapters need.

    Each open store is one process's view of the state, known by `process_id`: the user turns it is
    answering carry that id, so that when the process dies another can tell them apart and take them
    over (`unanswered`, `adopt`). `shared` says whether other processes may use the same state."""

    process_id: str
    shared: bool = False

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connections; the store is not used afterwards."""

    def request_buckets(self, per_minute: float, burst: int) -> RequestBuckets:
        """The per-user token buckets of the processes that share this state. One process's own
        memory, by default: a SQLite state belongs to one process."""
        return RateLimiter(per_minute, burst)

    async def publish(self, message: str) -> None:
        """Send `message` (a short text) to every process that shares this state, this one too (see
        `subscribe`). A state of one process has no others to tell: nothing is sent."""
        return None

    async def subscribe(self, receive: Callable[[str], None]) -> None:
        """Have `receive` called with each message that a process sharing this state publishes from
        now on (a state of one process: none)."""
        return None

    @abc.abstractmethod
    def hold_conversation(self, key: ConversationKey) -> AbstractAsyncContextManager[None]:
        """`async with store.hold_conversation(key):` one holder at a time per conversation, among all
        the processes that use this state; waiters get their turn in arrival order."""

    @abc.abstractmethod
    async def load_turns(self, key: ConversationKey, limit: int = 200) -> list[Turn]:
        """The newest `limit` turns of the conversation, oldest first."""

    @abc.abstractmethod
    async def add_turn(self, key: ConversationKey, turn: Turn, answerer: str | None = None, answers: int | None = None) -> Turn:
        """Append a turn; returns it with its `id`. `answerer`: the process that is answering this
        user turn now (None for a turn nobody answers, like one a newer message overtook).
        `answers`: the question this answer answers, which nobody is answering any more (its
        answerer goes, in the same transaction)."""

    @abc.abstractmethod
    async def remove_turn(self, turn_id: int) -> None:
        """Take back a turn (its message was deleted, or it was never answered)."""

    @abc.abstractmethod
    async def unanswered(self, platform: str, since: float) -> list[Unanswered]:
        """The user turns of `platform` stored at or after `since` (Unix time) that a process began to
        answer and can't finish any more, whatever came after them (none is followed by its answer
        nor was answered later): that process stopped (SQLite:
        any process but this one; PostgreSQL: one whose lease ran out and whose hold on the
        conversation is gone). Oldest first. Then the replies such a process began (`record_reply`)
        for a question it stopped before storing: their `turn` has no id and no parts, only the
        question's message id, and their messages are to be removed."""

    @abc.abstractmethod
    async def stranded(self, key: ConversationKey, since: float) -> int | None:
        """The id of the conversation's last turn if it is a question stored at or after `since` that
        another process began to answer and didn't: asked while holding the conversation, when
        nobody else can be answering it, so that process stopped (or lost its hold)."""

    @abc.abstractmethod
    async def adopt(self, pending: Unanswered) -> bool:
        """Make this process the answerer of `pending` if it still has the answerer it was found
        with (a reply without a stored question: take it to remove its messages); True for exactly
        one of several processes that try."""

    @abc.abstractmethod
    async def record_reply(self, platform: str, question: str, messages: Sequence[str], where: ConversationKey | None = None) -> None:
        """Remember the platform ids of the messages this process posted so far in answer to the
        message `question` (of the conversation `where`), so that a process taking the question over
        can edit them, or, if this process stops before the question is stored, remove them (found
        by `unanswered` as a question without a turn)."""

    @abc.abstractmethod
    async def forget_reply(self, platform: str, question: str) -> None:
        """The reply to the message `question` is shown in full: its messages are nobody's to
        continue or remove any more."""

    async def reset(self, key: ConversationKey, keep: frozenset[str] = frozenset()) -> int:
        """Forget a conversation, and the images only it used (but those in `keep`); returns how
        many turns it had."""
        count, digests = await self._reset(key)
        await self._release(digests, keep)
        if count:
            await self._scrub()
        return count

    async def forget_author(self, platform: str, author_id: str, keep: frozenset[str] = frozenset()) -> Forgotten:
        """Forget a person: their turns in every conversation of `platform`, the answers to them, and
        the images only they sent."""
        turns, digests = await self._forget_author(platform, author_id)
        images, size = await self._release(digests, keep)
        if turns:
            await self._scrub()
        return Forgotten(turns, images, size)

    async def prune(self, turns_before: float | None, keep: frozenset[str], grace_s: float, dry_run: bool = False) -> Forgotten:
        """Delete the turns stored before `turns_before` (Unix time; None: none), then the images
        nothing refers to any more (no turn, no channel's last image, not in `keep`) that were not
        stored in the last `grace_s` seconds. With `dry_run`, only say what would go."""
        turns = await self._old_turns(turns_before, delete=not dry_run) if turns_before is not None else 0
        referenced = await self._image_references(since=turns_before)
        stored = await self._stored_images()
        gone = {digest: size for digest, (size, age) in stored.items() if digest not in referenced and digest not in keep and age >= grace_s}
        if not dry_run:
            await self._delete_images(list(gone), grace_s)
            if turns:
                await self._scrub()
        return Forgotten(turns, len(gone), sum(gone.values()), tuple(sorted(gone)))

    async def _release(self, digests: set[str], keep: frozenset[str]) -> tuple[int, int]:
        """Delete at once those of `digests` that nothing refers to any more (a person asked for it:
        no grace period); returns how many, and their bytes."""
        if not digests:
            return 0, 0
        referenced = await self._image_references(since=None)
        stored = await self._stored_images()
        gone = {d: stored[d][0] for d in digests - referenced - keep if d in stored}
        await self._delete_images(list(gone), 0.0)
        return len(gone), sum(gone.values())

    async def _scrub(self) -> None:
        """After turns were deleted: leave no copy of them in the store's files (a store whose
        deletions leave none has nothing to do)."""
        return None

    # The primitives of forgetting, per store.

    @abc.abstractmethod
    async def _reset(self, key: ConversationKey) -> tuple[int, set[str]]:
        """Delete a conversation's turns: how many, and the image digests they named."""

    @abc.abstractmethod
    async def _forget_author(self, platform: str, author_id: str) -> tuple[int, set[str]]:
        """Delete a person's turns and the assistant turns that answered them, and the channels'
        last images that were theirs: how many turns, and the image digests they named."""

    @abc.abstractmethod
    async def _old_turns(self, before: float, delete: bool) -> int:
        """How many turns were stored before `before`; deleted too with `delete`."""

    @abc.abstractmethod
    async def _image_references(self, since: float | None) -> set[str]:
        """The digests named by turns (stored at or after `since`, if given) and channels' last images."""

    @abc.abstractmethod
    async def _stored_images(self) -> dict[str, tuple[int, float]]:
        """Every stored image: digest -> (bytes, seconds since it was last stored)."""

    @abc.abstractmethod
    async def _delete_images(self, digests: list[str], grace_s: float) -> None:
        """Delete these images, each only if it was not stored again in the last `grace_s` seconds."""

    @abc.abstractmethod
    async def conversations_in(self, platform: str, channel: str) -> list[ConversationKey]:
        """The conversations of a channel that have turns (its threads, and the channel's own)."""

    @abc.abstractmethod
    async def has_conversation(self, key: ConversationKey) -> bool:
        """Whether anything was said in this conversation (and not reset)."""

    @abc.abstractmethod
    async def put_image(self, image: ModelImage) -> ImageRef: ...

    @abc.abstractmethod
    async def get_image(self, ref: ImageRef) -> ModelImage: ...

    @abc.abstractmethod
    async def link_message(self, platform: str, message_id: str, key: ConversationKey) -> None:
        """Remember that a platform message belongs to a conversation (for reply chains)."""

    @abc.abstractmethod
    async def conversation_of(self, platform: str, message_id: str) -> ConversationKey | None: ...

    @abc.abstractmethod
    async def claim_event(self, platform: str, event_id: str) -> bool:
        """True the first time an event id is seen, False for every re-delivery."""

    @abc.abstractmethod
    async def remember_image(self, platform: str, channel: str, ref: ImageRef) -> None:
        """Note the latest image seen in a channel."""

    @abc.abstractmethod
    async def last_image(self, platform: str, channel: str) -> ImageRef | None: ...

    @abc.abstractmethod
    async def record_feedback(self, turn_id: int, platform: str, user_id: str, vote: str) -> bool:
        """Keep `user_id`'s vote on the stored answer `turn_id` (their last vote counts); False if that
        answer is no longer stored (reset, or regenerated)."""

    @abc.abstractmethod
    async def feedback_of(self, turn_id: int) -> dict[str, str]:
        """The votes on an answer: user id -> vote."""

    @abc.abstractmethod
    async def get_value(self, name: str) -> str | None:
        """A value the bot keeps for itself (e.g. the hash of the Discord commands it registered)."""

    @abc.abstractmethod
    async def set_value(self, name: str, value: str) -> None: ...


@dataclass(frozen=True)
class Forgotten:
    """What forgetting or pruning deleted (or, in a dry run, would delete)."""

    turns: int
    images: int
    image_bytes: int
    digests: tuple[str, ...] = ()


_MIGRATIONS = migrations("sqlite")
SCHEMA_VERSION = len(_MIGRATIONS)
# Platforms re-deliver an event for minutes at most; a week of event ids is plenty.
EVENT_MEMORY_S = 7 * 24 * 3600


def encode_parts(parts: tuple[Part, ...]) -> str:
    return json.dumps([part if isinstance(part, str) else {"image": part.digest, "name": part.name} for part in parts])


def digests_in(encoded: Iterable[str]) -> set[str]:
    """The image digests named by turns' encoded parts."""
    return {part.digest for text in encoded for part in decode_parts(text) if isinstance(part, ImageRef)}


def decode_parts(text: str) -> tuple[Part, ...]:
    return tuple(part if isinstance(part, str) else ImageRef(part["image"], part["name"]) for part in json.loads(text))


def _reason(error: Exception) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


class SQLiteStore(Store):
    """The default store: a SQLite file at `path`, images in `images/` next to it. Made ready by
    `await SQLiteStore.open(path)`."""

    _db: sqlite3.Connection  # used on the executor's thread only

    def __init__(self, path: Path):
        self.path = path
        self.images_dir = self.path.parent / "images"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._locks = ConversationLocks()
        self.process_id = uuid.uuid4().hex  # a SQLite file has one process at a time: this run

    async def _run(self, function, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        except (sqlite3.OperationalError, OSError) as exc:  # SQLITE_FULL, SQLITE_IOERR, ENOSPC writing an image, ...
            raise StoreUnavailable(f"{self.path}: {_reason(exc)}") from None

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | Path) -> SQLiteStore:
        """The store at `path`, created or brought up to this version's schema; `StoreError` saying
        what to do when it can't be used."""
        store = cls(Path(path))
        try:
            await store._run(store._open)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.images_dir.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise self._unwritable(exc) from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a killed process loses no committed change
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten with zeros, not just unlinked
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"The state file {self.path} was written by a newer idefics-bot (schema {version}, this one knows "
                    f"{SCHEMA_VERSION}). Upgrade idefics-bot or point [state] path elsewhere."
                )
            for number in range(version, SCHEMA_VERSION):
                try:  # executescript commits first and runs in autocommit, so the script is its own transaction
                    db.executescript(f"BEGIN IMMEDIATE; {_MIGRATIONS[number]}; PRAGMA user_version={number + 1}; COMMIT;")
                except sqlite3.Error:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            db.execute("DELETE FROM events WHERE seen < ?", (time.time() - EVENT_MEMORY_S,))
            db.execute("DELETE FROM replies WHERE seen < ?", (time.time() - EVENT_MEMORY_S,))
        except sqlite3.DatabaseError as exc:
            db.close()
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                raise StoreError(
                    f"The state file {self.path} is not a readable idefics-bot database ({exc}). Move it aside to start with "
                    "empty state, or restore it from a backup."
                ) from None
            raise self._unwritable(exc) from None
        except StoreError:
            db.close()
            raise
        self._db = db

    def _unwritable(self, error: Exception) -> StoreError:
        """Why the state can't be opened for writing, naming the place to fix: a valid database on a
        read-only mount or with the wrong owner must not be taken for a damaged one."""
        directory = self.path.parent
        existing = next(folder for folder in (directory, *directory.parents) if folder.exists())
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            why = f"{existing} is on a read-only file system"
        elif existing != directory:
            why = f"the directory {directory} does not exist and can't be created in {existing} ({_reason(error)})"
        elif not existing.is_dir():
            why = f"{existing} is not a directory"
        elif self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            info = self.path.stat()
            why = f"this user (uid {os.getuid()}) may not write the file (owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)})"
        elif not os.access(directory, os.W_OK | os.X_OK):
            info = directory.stat()
            why = (
                f"this user (uid {os.getuid()}) may not write in its directory {directory} (owner uid {info.st_uid}, mode "
                f"{stat.filemode(info.st_mode)}), where SQLite keeps its -wal and -shm files and the images"
            )
        else:
            why = _reason(error)
        return StoreError(
            f"The state file {self.path} can't be opened for writing: {why}. Nothing in it was changed. Fix the mount or "
            "the permissions, or point [state] path at a writable place."
        )

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)

    # -- conversations -----------------------------------------------------------------------

    @asynccontextmanager
    async def hold_conversation(self, key: ConversationKey) -> AsyncIterator[None]:
        """A SQLite file has one process, so turns taken within this process are enough."""
        async with self._locks.hold(key):
            yield

    def _conversation_id(self, key: ConversationKey, create: bool) -> int | None:
        row = self._db.execute(
            "SELECT id FROM conversations WHERE platform=? AND channel=? AND thread=?", (key.platform, key.channel, key.thread)
        ).fetchone()
        if row is not None or not create:
            return row[0] if row else None
        return self._db.execute(
            "INSERT INTO conversations (platform, channel, thread, created) VALUES (?, ?, ?, ?)",
            (key.platform, key.channel, key.thread, time.time()),
        ).lastrowid

    async def load_turns(self, key: ConversationKey, limit: int = 200) -> list[Turn]:
        def load() -> list[Turn]:
            rows = self._db.execute(
                """SELECT t.id, t.role, t.author_id, t.author_name, t.parts, t.message_id, t.dropped
                   FROM turns t JOIN conversations c ON c.id = t.conversation_id
                   WHERE c.platform=? AND c.channel=? AND c.thread=? ORDER BY t.id DESC LIMIT ?""",
                (key.platform, key.channel, key.thread, limit),
            ).fetchall()
            return [
                Turn(role, decode_parts(parts), Author(author_id, author_name) if author_id is not None else None, message_id, dropped, id=id_)
                for id_, role, author_id, author_name, parts, message_id, dropped in reversed(rows)
            ]

        return await self._run(load)

    async def add_turn(self, key: ConversationKey, turn: Turn, answerer: str | None = None, answers: int | None = None) -> Turn:
        def add() -> Turn:
            with self._transaction():
                conversation = self._conversation_id(key, create=True)
                author = turn.author
                turn_id = self._db.execute(
                    "INSERT INTO turns (conversation_id, role, author_id, author_name, parts, message_id, dropped, created, answerer)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        conversation,
                        turn.role,
                        author.id if author else None,
                        author.name if author else None,
                        encode_parts(turn.parts),
                        turn.message_id,
                        turn.dropped,
                        time.time(),
                        answerer,
                    ),
                ).lastrowid
                if answers is not None:
                    self._db.execute("UPDATE turns SET answerer = NULL WHERE id=?", (answers,))
            return Turn(turn.role, turn.parts, turn.author, turn.message_id, turn.dropped, id=turn_id)

        return await self._run(add)

    async def remove_turn(self, turn_id: int) -> None:
        await self._run(self._write, "DELETE FROM turns WHERE id=?", (turn_id,))

    async def unanswered(self, platform: str, since: float) -> list[Unanswered]:
        def find() -> list[Unanswered]:
            rows = self._db.execute(
                """SELECT c.channel, c.thread, t.id, t.author_id, t.author_name, t.parts, t.message_id, t.answerer, r.messages
                   FROM conversations c JOIN turns t ON t.conversation_id = c.id
                   LEFT JOIN replies r ON r.platform = c.platform AND r.question = t.message_id AND t.message_id != ''
                   WHERE c.platform=? AND t.role='user' AND t.created >= ? AND t.answerer != ?
                     AND coalesce((SELECT n.role FROM turns n WHERE n.conversation_id = c.id AND n.id > t.id ORDER BY n.id LIMIT 1), '') != 'assistant'
                   ORDER BY t.id""",
                (platform, since, self.process_id),
            ).fetchall()
            return [
                Unanswered(
                    ConversationKey(platform, channel, thread),
                    Turn("user", decode_parts(parts), Author(author_id, author_name) if author_id is not None else None, message_id, id=id_),
                    answerer,
                    tuple(json.loads(reply)) if reply else (),
                )
                for channel, thread, id_, author_id, author_name, parts, message_id, answerer, reply in rows
            ] + [
                Unanswered(ConversationKey(platform, channel, thread), Turn("user", (), message_id=question), owner, tuple(json.loads(reply)))
                for channel, thread, question, owner, reply in self._db.execute(
                    """SELECT r.channel, r.thread, r.question, r.owner, r.messages FROM replies r
                       WHERE r.platform=? AND r.owner != ? AND r.seen >= ? AND NOT EXISTS (
                           SELECT 1 FROM turns t JOIN conversations c ON c.id = t.conversation_id
                           WHERE c.platform = r.platform AND t.message_id = r.question AND t.role = 'user')
                       ORDER BY r.seen""",
                    (platform, self.process_id, since),
                ).fetchall()
            ]

        return await self._run(find)

    async def stranded(self, key: ConversationKey, since: float) -> int | None:
        def find() -> int | None:
            row = self._db.execute(
                """SELECT t.id, t.role, t.answerer, t.created FROM turns t JOIN conversations c ON c.id = t.conversation_id
                   WHERE c.platform=? AND c.channel=? AND c.thread=? ORDER BY t.id DESC LIMIT 1""",
                (key.platform, key.channel, key.thread),
            ).fetchone()
            if row is None:
                return None
            turn_id, role, answerer, created = row
            return turn_id if role == "user" and answerer not in (None, self.process_id) and created >= since else None

        return await self._run(find)

    async def adopt(self, pending: Unanswered) -> bool:
        def adopt() -> bool:
            if pending.turn.id is None:
                cursor = self._db.execute(
                    "DELETE FROM replies WHERE platform=? AND question=? AND owner=?", (pending.key.platform, pending.turn.message_id, pending.answerer)
                )
            else:
                cursor = self._db.execute(
                    "UPDATE turns SET answerer=? WHERE id=? AND answerer=?", (self.process_id, pending.turn.id, pending.answerer)
                )
            return cursor.rowcount == 1

        return await self._run(adopt)

    async def record_reply(self, platform: str, question: str, messages: Sequence[str], where: ConversationKey | None = None) -> None:
        await self._run(
            self._write,
            "INSERT OR REPLACE INTO replies (platform, question, messages, seen, owner, channel, thread) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (platform, question, json.dumps(list(messages)), time.time(), self.process_id, where.channel if where else "", where.thread if where else ""),
        )

    async def forget_reply(self, platform: str, question: str) -> None:
        await self._run(self._write, "DELETE FROM replies WHERE platform=? AND question=?", (platform, question))

    async def _reset(self, key: ConversationKey) -> tuple[int, set[str]]:
        def reset() -> tuple[int, set[str]]:
            with self._transaction():
                conversation = self._conversation_id(key, create=False)
                if conversation is None:
                    return 0, set()
                rows = self._db.execute("SELECT parts FROM turns WHERE conversation_id=?", (conversation,)).fetchall()
                self._db.execute("DELETE FROM turns WHERE conversation_id=?", (conversation,))
                return len(rows), digests_in(parts for (parts,) in rows)

        return await self._run(reset)

    async def _forget_author(self, platform: str, author_id: str) -> tuple[int, set[str]]:
        def forget() -> tuple[int, set[str]]:
            with self._transaction():
                theirs = self._db.execute(
                    "SELECT t.id, t.conversation_id, t.parts FROM turns t JOIN conversations c ON c.id = t.conversation_id"
                    " WHERE c.platform=? AND t.role='user' AND t.author_id=?",
                    (platform, author_id),
                ).fetchall()
                gone = [turn_id for turn_id, _, _ in theirs]
                for turn_id, conversation, _ in theirs:
                    answer = self._db.execute(
                        "SELECT id, role FROM turns WHERE conversation_id=? AND id>? ORDER BY id LIMIT 1", (conversation, turn_id)
                    ).fetchone()
                    if answer is not None and answer[1] == "assistant":
                        gone.append(answer[0])
                self._db.executemany("DELETE FROM turns WHERE id=?", [(turn_id,) for turn_id in gone])
                digests = digests_in(parts for _, _, parts in theirs)
                self._db.executemany("DELETE FROM channel_images WHERE platform=? AND digest=?", [(platform, d) for d in digests])
                return len(gone), digests

        return await self._run(forget)

    async def _scrub(self) -> None:
        # The WAL still holds the pages as they were before the delete: copy the zeroed pages into the
        # database and empty the WAL, so a forgotten turn is in no file of the state folder.
        # The pragma answers with a row; read it, or its statement stays open and the next commit fails.
        await self._run(lambda: self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())

    async def _old_turns(self, before: float, delete: bool) -> int:
        def old() -> int:
            with self._transaction():
                count = self._db.execute("SELECT count(*) FROM turns WHERE created < ?", (before,)).fetchone()[0]
                if delete:
                    self._db.execute("DELETE FROM turns WHERE created < ?", (before,))
                return count

        return await self._run(old)

    async def _image_references(self, since: float | None) -> set[str]:
        def references() -> set[str]:
            rows = self._db.execute(
                "SELECT json_extract(j.value, '$.image') FROM turns t, json_each(t.parts) j WHERE j.type = 'object' AND t.created >= ?"
                " UNION SELECT digest FROM channel_images",
                (since if since is not None else float("-inf"),),
            ).fetchall()
            return {digest for (digest,) in rows}

        return await self._run(references)

    async def _stored_images(self) -> dict[str, tuple[int, float]]:
        def stored() -> dict[str, tuple[int, float]]:
            now, found = time.time(), {}
            for path in self.images_dir.glob("??/*.jpg"):
                try:
                    info = path.stat()
                except FileNotFoundError:  # deleted meanwhile
                    continue
                found[path.stem] = (info.st_size, now - info.st_mtime)
            return found

        return await self._run(stored)

    async def _delete_images(self, digests: list[str], grace_s: float) -> None:
        def delete() -> None:
            for digest in digests:
                path = self._image_path(digest)
                try:
                    if time.time() - path.stat().st_mtime >= grace_s:  # not stored again meanwhile
                        path.unlink()
                except FileNotFoundError:
                    pass

        await self._run(delete)

    async def conversations_in(self, platform: str, channel: str) -> list[ConversationKey]:
        def find() -> list[ConversationKey]:
            rows = self._db.execute(
                "SELECT c.platform, c.channel, c.thread FROM conversations c WHERE c.platform=? AND c.channel=?"
                " AND EXISTS (SELECT 1 FROM turns t WHERE t.conversation_id = c.id) ORDER BY c.id",
                (platform, channel),
            ).fetchall()
            return [ConversationKey(*row) for row in rows]

        return await self._run(find)

    async def has_conversation(self, key: ConversationKey) -> bool:
        def has() -> bool:
            return (
                self._db.execute(
                    "SELECT 1 FROM turns t JOIN conversations c ON c.id = t.conversation_id"
                    " WHERE c.platform=? AND c.channel=? AND c.thread=? LIMIT 1",
                    (key.platform, key.channel, key.thread),
                ).fetchone()
                is not None
            )

        return await self._run(has)

    # -- images ------------------------------------------------------------------------------

    def _image_path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise StoreError(f"Not an image digest: {digest!r}")
        return self.images_dir / digest[:2] / f"{digest}.jpg"

    async def put_image(self, image: ModelImage) -> ImageRef:
        def put() -> None:
            path = self._image_path(image.digest)
            if path.exists():
                os.utime(path)  # stored again: a prune running now leaves it alone
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(image.data)
            os.replace(partial, path)  # a reader never sees half an image

        await self._run(put)
        return ImageRef(image.digest, image.name)

    async def get_image(self, ref: ImageRef) -> ModelImage:
        def get() -> ModelImage:
            try:
                data = self._image_path(ref.digest).read_bytes()
            except FileNotFoundError:
                raise StoreError(f"The image {ref.name} ({ref.digest[:12]}) is missing from {self.images_dir}.") from None
            return ModelImage(ref.digest, data, ref.name)

        return await self._run(get)

    # -- adapter memories --------------------------------------------------------------------

    async def link_message(self, platform: str, message_id: str, key: ConversationKey) -> None:
        def link() -> None:
            with self._transaction():
                conversation = self._conversation_id(key, create=True)
                self._db.execute(
                    "INSERT OR REPLACE INTO messages (platform, message_id, conversation_id) VALUES (?, ?, ?)",
                    (platform, message_id, conversation),
                )

        await self._run(link)

    async def conversation_of(self, platform: str, message_id: str) -> ConversationKey | None:
        def find() -> ConversationKey | None:
            row = self._db.execute(
                "SELECT c.platform, c.channel, c.thread FROM messages m JOIN conversations c ON c.id = m.conversation_id"
                " WHERE m.platform=? AND m.message_id=?",
                (platform, message_id),
            ).fetchone()
            return ConversationKey(*row) if row else None

        return await self._run(find)

    async def claim_event(self, platform: str, event_id: str) -> bool:
        def claim() -> bool:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO events (platform, event_id, seen) VALUES (?, ?, ?)", (platform, event_id, time.time())
            )
            return cursor.rowcount == 1

        return await self._run(claim)

    async def record_feedback(self, turn_id: int, platform: str, user_id: str, vote: str) -> bool:
        def record() -> bool:
            cursor = self._db.execute(
                "INSERT INTO feedback (turn_id, user_id, platform, vote, at) SELECT id, ?, ?, ?, ? FROM turns WHERE id=?"
                " ON CONFLICT (turn_id, user_id) DO UPDATE SET vote = excluded.vote, at = excluded.at",
                (user_id, platform, vote, time.time(), turn_id),
            )
            return cursor.rowcount == 1

        return await self._run(record)

    async def feedback_of(self, turn_id: int) -> dict[str, str]:
        rows = await self._run(lambda: self._db.execute("SELECT user_id, vote FROM feedback WHERE turn_id=?", (turn_id,)).fetchall())
        return dict(rows)

    async def get_value(self, name: str) -> str | None:
        row = await self._run(lambda: self._db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone())
        return row[0] if row else None

    async def set_value(self, name: str, value: str) -> None:
        await self._run(self._write, "INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value))

    async def remember_image(self, platform: str, channel: str, ref: ImageRef) -> None:
        await self._run(
            self._write,
            "INSERT OR REPLACE INTO channel_images (platform, channel, digest, name, seen) VALUES (?, ?, ?, ?, ?)",
            (platform, channel, ref.digest, ref.name, time.time()),
        )

    async def last_image(self, platform: str, channel: str) -> ImageRef | None:
        def last() -> ImageRef | None:
            row = self._db.execute(
                "SELECT digest, name FROM channel_images WHERE platform=? AND channel=?", (platform, channel)
            ).fetchone()
            return ImageRef(*row) if row else None

        return await self._run(last)

    # -- helpers -----------------------------------------------------------------------------

    def _write(self, sql: str, args: tuple) -> None:
        self._db.execute(sql, args)

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
