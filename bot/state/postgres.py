"""The state in PostgreSQL, shared by several bot processes (on one machine or many).

`[state] url = "postgresql://..."` selects this store. It keeps what `SQLiteStore` keeps, and is
safe when several processes use one database at once:

- Slack event ids are claimed with one INSERT ... ON CONFLICT DO NOTHING, so of two processes that
  receive the same event (HTTP mode behind a load balancer), exactly one gets `True` and answers.
- `hold_conversation` takes a PostgreSQL advisory lock per conversation, so two messages of one
  conversation handled by two processes are answered one after the other, the second seeing the
  first's turns. See `hold_conversation` for the order waiters are served in.
- Images live in the database (bytea, keyed by content hash), not in files: every process, on any
  machine, then reads the same images without a shared disk, and one backup holds the turns with
  the images they name. They are small (JPEG within the `[images]` limits), stored once per
  content, and read only to build a prompt.
- Each process keeps a lease (a row in `processes`, renewed every `lease_s / 3`), and the user
  turns it is answering name it. When a process dies, its lease runs out and its holds end with its
  connections; `unanswered` then finds the questions it left, and another process `adopt`s them.
- Messages between the processes (`publish`, `subscribe`: a Stop click that reached a process other
  than the one writing the reply) go through PostgreSQL's LISTEN/NOTIFY on the channel `idefics_bot`,
  on one connection per process that listens.
- The schema is versioned (table `schema_version`); missing migrations are applied at start-up in
  one transaction under an advisory lock, so two processes starting together don't race.

Connections: queries share a small pool; each conversation being answered holds one more
connection (that is where its advisory lock lives) from a second pool, so a holder always finds
a connection for its queries. `max_connections` bounds both together, per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from bot.state.lock import ConversationLocks
from bot.state.rates import RequestBuckets
from bot.state.schema import migrations
from bot.state.store import EVENT_MEMORY_S, Store, StoreError, decode_parts, digests_in, encode_parts
from ground.conversation import Author, ConversationKey, ImageRef, Turn, Unanswered
from ground.images import ModelImage

log = logging.getLogger(__name__)

_MIGRATIONS = migrations("postgres")
SCHEMA_VERSION = len(_MIGRATIONS)
# A bucket that hasn't been used for a day is full again: its row can go.
_IDLE_BUCKET_S = 24 * 3600

# One request taken from a bucket, atomically however many processes take at once: the bucket is
# refilled for the time since its last use (at `rate` tokens a second, up to `burst`), then one
# token is taken if there is one. A new bucket starts full.
_TAKE = """
INSERT INTO rate_buckets AS b (bucket, tokens, granted, updated) VALUES ($1, $3 - 1, true, now())
ON CONFLICT (bucket) DO UPDATE SET
    tokens = least($3, b.tokens + extract(epoch FROM now() - b.updated) * $2)
             - CASE WHEN least($3, b.tokens + extract(epoch FROM now() - b.updated) * $2) >= 1 THEN 1 ELSE 0 END,
    granted = least($3, b.tokens + extract(epoch FROM now() - b.updated) * $2) >= 1,
    updated = now()
RETURNING tokens, granted
"""


class SharedRateLimiter:
    """Token buckets in the database, shared by every process that uses it: with N processes, a
    person still gets the documented rate, not N times it. One statement per request."""

    def __init__(self, store: PostgresStore, per_minute: float, burst: int):
        self.store, self.rate, self.burst = store, per_minute / 60.0, burst

    async def take(self, key: str) -> float:
        try:
            tokens, granted = await self.store.take_token(key, self.rate, self.burst)
        except (asyncpg.PostgresError, OSError, TimeoutError) as error:  # let the request in rather than fail it
            log.warning("store.rate_limit_unavailable", extra={"error": type(error).__name__})
            return 0.0
        if granted:
            return 0.0
        return (1 - tokens) / self.rate if self.rate else math.inf

# Advisory locks of idefics-bot use the two-int4 key space (apart from single-bigint keys), with
# these first halves: one for the schema, one for conversations (the second half hashes the key).
_SCHEMA_LOCK = (0x1DEF1C50, 0)
_CONVERSATION_LOCKS = 0x1DEF1C51
QUERY_CONNECTIONS = 4
_CONNECT_TIMEOUT_S = 10.0
_QUERY_TIMEOUT_S = 60.0
_CLOSE_TIMEOUT_S = 10.0
_CHANNEL = "idefics_bot"  # LISTEN/NOTIFY: messages between the processes
_RELISTEN_S = 1.0  # a listening connection that broke is opened again after this long


def conversation_lock(key: ConversationKey) -> tuple[int, int]:
    """The advisory lock of a conversation: the same in every process. Two conversations that share
    one (a 1 in 4 billion chance) only wait for each other."""
    digest = hashlib.blake2b(json.dumps([key.platform, key.channel, key.thread]).encode(), digest_size=4).digest()
    return _CONVERSATION_LOCKS, int.from_bytes(digest, "big", signed=True)


def _url_parts(url: str) -> tuple[str, str, str]:
    """The user, host(s) and database a PostgreSQL URL names (never its password)."""
    parts = urlsplit(url)
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    credentials, _, hosts = parts.netloc.rpartition("@")
    user = query.get("user") or unquote(credentials.partition(":")[0]) or "the default user"
    host = query.get("host") or hosts or "the default host"
    database = query.get("dbname") or query.get("database") or unquote(parts.path.lstrip("/")) or "the default database"
    return user, host, database


def describe_url(url: str) -> str:
    """Where a PostgreSQL URL points, without its password: 'database D on H as U'."""
    user, host, database = _url_parts(url)
    return f"database {database} on {host} as {user}"


def _start_up_error(url: str, error: BaseException) -> StoreError:
    """One readable sentence for a failure to connect: what is wrong and what to do."""
    where = describe_url(url)
    if isinstance(error, asyncpg.InvalidPasswordError):
        return StoreError(f"PostgreSQL refused the password for the {where}. Fix the password in [state] url (or DATABASE_URL).")
    if isinstance(error, asyncpg.InvalidAuthorizationSpecificationError):
        return StoreError(
            f"PostgreSQL refused the login to the {where} ({error}). Fix the user in [state] url, or the server's pg_hba.conf."
        )
    if isinstance(error, asyncpg.InvalidCatalogNameError):
        _, host, database = _url_parts(url)
        return StoreError(
            f"PostgreSQL on {host} has no database {database}. Create it (createdb {database}), or fix the database name in [state] url."
        )
    if isinstance(error, asyncpg.InsufficientPrivilegeError):
        return StoreError(
            f"PostgreSQL doesn't let idefics-bot create its tables in the {where} ({error}). Grant that user CREATE on the database, or use a database it owns."
        )
    if isinstance(error, asyncpg.PostgresError):
        return StoreError(f"PostgreSQL refused the {where} ({error}). Check the server's log and [state] url.")
    if isinstance(error, ValueError):
        return StoreError(
            "[state] url is not a usable PostgreSQL URL; write it as postgresql://user:password@host:port/database."
        )
    reason = "no answer in time" if isinstance(error, TimeoutError) else str(error) or type(error).__name__
    return StoreError(
        f"PostgreSQL can't be reached for the {where} ({reason}). Check that the server is running and that [state] url names it."
    )


class PostgresStore(Store):
    """The shared store: all state in one PostgreSQL database. `url` is a postgresql:// URL. Made
    ready by `await PostgresStore.open(url)`."""

    _pool: asyncpg.Pool  # for queries
    _lock_pool: asyncpg.Pool  # its connections hold conversations' advisory locks
    _renewing: asyncio.Task  # keeps this process's lease fresh

    shared = True

    def __init__(self, url: str, max_connections: int = 20, lease_s: float = 10.0):
        """`lease_s`: a process that hasn't renewed its lease for this long is taken for dead."""
        if max_connections <= QUERY_CONNECTIONS:
            raise ValueError(f"max_connections must be more than {QUERY_CONNECTIONS}")
        self._url = url
        self._max_connections = max_connections
        self.lease_s = lease_s
        self.process_id = uuid.uuid4().hex
        self._locks = ConversationLocks()
        self.where = describe_url(url)
        self._receivers: list[Callable[[str], None]] = []
        self._listener: asyncpg.Connection | None = None  # LISTENs on _CHANNEL, once something subscribed
        self._relistening: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({self.where})"

    def _create_pool(self, min_size: int, max_size: int, command_timeout: float | None) -> asyncpg.Pool:
        return asyncpg.create_pool(
            self._url,
            min_size=min_size,
            max_size=max_size,
            timeout=_CONNECT_TIMEOUT_S,
            command_timeout=command_timeout,
            server_settings={"application_name": "idefics-bot"},
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, max_connections: int = 20, lease_s: float = 10.0) -> PostgresStore:
        """The store on the database at `url`, its schema brought up to this version's, this process's
        lease taken; `StoreError` saying what to do when it can't be used. `max_connections` bounds the
        connections it keeps; a process that hasn't renewed its lease for `lease_s` is taken for dead."""
        store = cls(url, max_connections, lease_s)
        await store._connect()
        return store

    async def _connect(self) -> None:
        try:
            pool = await self._create_pool(1, QUERY_CONNECTIONS, _QUERY_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError, asyncpg.PostgresError) as error:
            raise _start_up_error(self._url, error) from None
        try:
            async with pool.acquire() as connection:
                await self._migrate(connection)
                for table in ("events", "replies", "processes"):
                    await connection.execute(f"DELETE FROM {table} WHERE seen < now() - make_interval(secs => $1)", float(EVENT_MEMORY_S))
                await connection.execute("INSERT INTO processes (id) VALUES ($1)", self.process_id)
                await connection.execute("DELETE FROM rate_buckets WHERE updated < now() - make_interval(secs => $1)", float(_IDLE_BUCKET_S))
        except BaseException as error:
            pool.terminate()
            if isinstance(error, asyncpg.PostgresConnectionError | asyncpg.InsufficientPrivilegeError | OSError | TimeoutError):
                raise _start_up_error(self._url, error) from None
            if isinstance(error, asyncpg.PostgresError):
                raise StoreError(
                    f"The {self.where} can't be set up for idefics-bot ({error}). Give idefics-bot a database of its own, "
                    "or check the server's log."
                ) from None
            raise
        self._pool = pool
        try:  # lock connections wait on the server for as long as a conversation is busy: no command timeout
            self._lock_pool = await self._create_pool(0, self._max_connections - QUERY_CONNECTIONS, None)
        except BaseException:
            pool.terminate()
            raise
        self._renewing = asyncio.create_task(self._renew_lease(), name="store-lease")
        log.info("store.opened", extra={"store": "postgresql", "where": self.where, "schema": SCHEMA_VERSION, "process_id": self.process_id})

    async def _renew_lease(self) -> None:
        """Keep this process's lease fresh: three renewals per `lease_s`, so one slow one is no death."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._pool.execute("UPDATE processes SET seen = now() WHERE id = $1", self.process_id)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("store.lease_not_renewed", extra={"error": type(error).__name__})

    def request_buckets(self, per_minute: float, burst: int) -> RequestBuckets:
        return SharedRateLimiter(self, per_minute, burst)

    async def take_token(self, bucket: str, rate: float, burst: int) -> tuple[float, bool]:
        """Take a token from `bucket` (see `_TAKE`): the tokens left, and whether one was taken."""
        row = await self._pool.fetchrow(_TAKE, bucket, rate, float(burst))
        return row["tokens"], row["granted"]

    async def _migrate(self, connection: asyncpg.Connection) -> None:
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1, $2)", *_SCHEMA_LOCK)
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            version = await connection.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"The {self.where} was written by a newer idefics-bot (schema {version}, this one knows {SCHEMA_VERSION}). "
                    "Upgrade idefics-bot or point [state] url elsewhere."
                )
            for number in range(version, SCHEMA_VERSION):
                await connection.execute(_MIGRATIONS[number])
                await connection.execute("INSERT INTO schema_version (version) VALUES ($1)", number + 1)
                log.info("store.migrated", extra={"where": self.where, "schema": number + 1})

    # -- messages between the processes ------------------------------------------------------

    async def publish(self, message: str) -> None:
        await self._pool.execute("SELECT pg_notify($1, $2)", _CHANNEL, message)

    async def subscribe(self, receive: Callable[[str], None]) -> None:
        if self._listener is None:
            await self._listen()
        self._receivers.append(receive)

    async def _listen(self) -> None:
        connection = await asyncpg.connect(self._url, timeout=_CONNECT_TIMEOUT_S, server_settings={"application_name": "idefics-bot"})
        await connection.add_listener(_CHANNEL, self._heard)
        connection.add_termination_listener(self._lost)
        self._listener = connection

    def _heard(self, connection: object, pid: int, channel: str, payload: str) -> None:
        for receive in self._receivers:
            receive(payload)

    def _lost(self, connection: object) -> None:
        """The listening connection broke (the server restarted, say): listen again, until closed."""
        if self._listener is None or self._listener is not connection:
            return
        log.warning("store.listener_lost")
        self._listener = None
        self._relistening = asyncio.get_running_loop().create_task(self._relisten(), name="store-relisten")

    async def _relisten(self) -> None:
        while self._listener is None:
            await asyncio.sleep(_RELISTEN_S)
            try:
                await self._listen()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("store.listener_not_restored", extra={"error": type(error).__name__})
        log.info("store.listener_restored")

    async def close(self) -> None:
        listener, self._listener = self._listener, None  # None first: its end is no loss
        if self._relistening is not None:
            self._relistening.cancel()
            await asyncio.gather(self._relistening, return_exceptions=True)
        if listener is not None:
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await listener.close()
            except (TimeoutError, OSError, asyncpg.InterfaceError):
                listener.terminate()
        self._renewing.cancel()
        await asyncio.gather(self._renewing, return_exceptions=True)
        try:  # a process that stops cleanly leaves nothing unanswered; its lease goes with it
            await self._pool.execute("DELETE FROM processes WHERE id = $1", self.process_id)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("store.lease_not_removed", extra={"error": type(error).__name__})
        for pool in (self._lock_pool, self._pool):
            try:  # a graceful close waits for connections in use; a stuck holder mustn't stop a shutdown
                async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    # -- one conversation at a time --------------------------------------------------------

    @asynccontextmanager
    async def hold_conversation(self, key: ConversationKey) -> AsyncIterator[None]:
        """Serialise work on a conversation across every process that uses this database.

        Within a process, waiters take turns in arrival order, and only the first of them waits on
        the server (so a process needs one connection per busy conversation, not per message).
        Between processes, PostgreSQL's lock queue is first come, first served: a conversation's
        messages are answered in the order their processes asked the database for it. A process
        asks for its next message once its previous one is done, so another process's message
        may come in between, but each process's own messages keep their arrival order.

        The lock belongs to the session of a connection held for the purpose: if the connection or
        the whole process dies, the server frees the lock, and the next waiter goes on.
        """
        async with self._locks.hold(key), self._lock_pool.acquire() as connection:
            lock = conversation_lock(key)
            # Cancelled while waiting for the lock or in it: releasing the connection to the pool
            # resets it with pg_advisory_unlock_all() (or, failing that, closes it).
            await connection.execute("SELECT pg_advisory_lock($1, $2)", *lock)
            try:
                yield
            finally:
                try:
                    await connection.execute("SELECT pg_advisory_unlock($1, $2)", *lock)
                except Exception as error:
                    # The connection broke, and with its session the lock ended, perhaps earlier
                    # than this holder thought: another process may have been in the conversation.
                    log.warning("store.conversation_lock_lost", extra={"conversation": str(key), "error": type(error).__name__})

    # -- conversations -----------------------------------------------------------------------

    @staticmethod
    async def _conversation_id(connection: asyncpg.Connection, key: ConversationKey) -> int:
        """The conversation's id, created if new. Rows are never deleted, so once found it stays."""
        select = "SELECT id FROM conversations WHERE platform=$1 AND channel=$2 AND thread=$3"
        found = await connection.fetchval(select, key.platform, key.channel, key.thread)
        if found is None:
            found = await connection.fetchval(
                "INSERT INTO conversations (platform, channel, thread) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING id",
                key.platform,
                key.channel,
                key.thread,
            )
        if found is None:  # another process created it meanwhile; this new statement sees its row
            found = await connection.fetchval(select, key.platform, key.channel, key.thread)
        return found

    async def load_turns(self, key: ConversationKey, limit: int = 200) -> list[Turn]:
        rows = await self._pool.fetch(
            """SELECT t.id, t.role, t.author_id, t.author_name, t.parts, t.message_id, t.dropped
               FROM turns t JOIN conversations c ON c.id = t.conversation_id
               WHERE c.platform=$1 AND c.channel=$2 AND c.thread=$3 ORDER BY t.id DESC LIMIT $4""",
            key.platform,
            key.channel,
            key.thread,
            limit,
        )
        return [
            Turn(
                row["role"],
                decode_parts(row["parts"]),
                Author(row["author_id"], row["author_name"]) if row["author_id"] is not None else None,
                row["message_id"],
                row["dropped"],
                id=row["id"],
            )
            for row in reversed(rows)
        ]

    async def add_turn(self, key: ConversationKey, turn: Turn, answerer: str | None = None, answers: int | None = None) -> Turn:
        async with self._pool.acquire() as connection, connection.transaction():
            conversation = await self._conversation_id(connection, key)
            author = turn.author
            turn_id = await connection.fetchval(
                "INSERT INTO turns (conversation_id, role, author_id, author_name, parts, message_id, dropped, answerer)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
                conversation,
                turn.role,
                author.id if author else None,
                author.name if author else None,
                encode_parts(turn.parts),
                turn.message_id,
                turn.dropped,
                answerer,
            )
            if answers is not None:
                await connection.execute("UPDATE turns SET answerer = NULL WHERE id = $1", answers)
        return Turn(turn.role, turn.parts, turn.author, turn.message_id, turn.dropped, id=turn_id)

    async def remove_turn(self, turn_id: int) -> None:
        await self._pool.execute("DELETE FROM turns WHERE id=$1", turn_id)

    async def unanswered(self, platform: str, since: float) -> list[Unanswered]:
        # A lease can run out while its process lives on (stalled); the process still holds the
        # conversation then, and its questions are left to it. The holds are read first: a
        # conversation taken since by a process adopting its question is then one that process
        # answers, whose lease is fresh, so the questions below leave it out anyway.
        held = {
            row["objid"]
            for row in await self._pool.fetch(
                "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1 AND objsubid = 2 AND granted",
                _CONVERSATION_LOCKS,
            )
        }
        rows = await self._pool.fetch(
            """SELECT c.channel, c.thread, t.id, t.author_id, t.author_name, t.parts, t.message_id, t.answerer, r.messages
               FROM turns t JOIN conversations c ON c.id = t.conversation_id
               LEFT JOIN replies r ON r.platform = c.platform AND r.question = t.message_id AND t.message_id <> ''
               WHERE t.role = 'user' AND t.created >= to_timestamp($2) AND c.platform = $1 AND t.answerer <> $3
                 AND coalesce((SELECT n.role FROM turns n WHERE n.conversation_id = t.conversation_id AND n.id > t.id ORDER BY n.id LIMIT 1), '')
                     <> 'assistant'
                 AND NOT EXISTS (SELECT 1 FROM processes p WHERE p.id = t.answerer AND p.seen > now() - make_interval(secs => $4))
               ORDER BY t.id""",
            platform,
            since,
            self.process_id,
            self.lease_s,
        )
        found = []
        for row in rows:
            key = ConversationKey(platform, row["channel"], row["thread"])
            if conversation_lock(key)[1] & 0xFFFFFFFF in held:
                continue
            author = Author(row["author_id"], row["author_name"]) if row["author_id"] is not None else None
            turn = Turn("user", decode_parts(row["parts"]), author, row["message_id"], id=row["id"])
            found.append(Unanswered(key, turn, row["answerer"], tuple(json.loads(row["messages"])) if row["messages"] else ()))
        # Replies whose process stopped before storing their question: nothing to answer, messages to remove.
        orphans = await self._pool.fetch(
            """SELECT r.channel, r.thread, r.question, r.owner, r.messages FROM replies r
               WHERE r.platform = $1 AND r.owner <> $2 AND r.seen >= to_timestamp($3)
                 AND NOT EXISTS (SELECT 1 FROM processes p WHERE p.id = r.owner AND p.seen > now() - make_interval(secs => $4))
                 AND NOT EXISTS (SELECT 1 FROM turns t JOIN conversations c ON c.id = t.conversation_id
                                 WHERE c.platform = r.platform AND t.message_id = r.question AND t.role = 'user')
               ORDER BY r.seen""",
            platform,
            self.process_id,
            since,
            self.lease_s,
        )
        for row in orphans:
            key = ConversationKey(platform, row["channel"], row["thread"])
            found.append(Unanswered(key, Turn("user", (), message_id=row["question"]), row["owner"], tuple(json.loads(row["messages"]))))
        return found

    async def stranded(self, key: ConversationKey, since: float) -> int | None:
        row = await self._pool.fetchrow(
            """SELECT t.id, t.role = 'user' AND t.answerer <> $4 AND t.created >= to_timestamp($5) AS stranded
               FROM turns t JOIN conversations c ON c.id = t.conversation_id
               WHERE c.platform=$1 AND c.channel=$2 AND c.thread=$3 ORDER BY t.id DESC LIMIT 1""",
            key.platform,
            key.channel,
            key.thread,
            self.process_id,
            since,
        )
        return row["id"] if row is not None and row["stranded"] else None

    async def adopt(self, pending: Unanswered) -> bool:
        if pending.turn.id is None:
            status = await self._pool.execute(
                "DELETE FROM replies WHERE platform = $1 AND question = $2 AND owner = $3", pending.key.platform, pending.turn.message_id, pending.answerer
            )
            return status == "DELETE 1"
        status = await self._pool.execute(
            "UPDATE turns SET answerer = $1 WHERE id = $2 AND answerer = $3", self.process_id, pending.turn.id, pending.answerer
        )
        return status == "UPDATE 1"

    async def record_reply(self, platform: str, question: str, messages: Sequence[str], where: ConversationKey | None = None) -> None:
        await self._pool.execute(
            "INSERT INTO replies (platform, question, messages, owner, channel, thread) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (platform, question) DO UPDATE SET messages = EXCLUDED.messages, seen = now(), owner = EXCLUDED.owner,"
            " channel = EXCLUDED.channel, thread = EXCLUDED.thread",
            platform,
            question,
            json.dumps(list(messages)),
            self.process_id,
            where.channel if where else "",
            where.thread if where else "",
        )

    async def forget_reply(self, platform: str, question: str) -> None:
        await self._pool.execute("DELETE FROM replies WHERE platform = $1 AND question = $2", platform, question)

    async def _reset(self, key: ConversationKey) -> tuple[int, set[str]]:
        rows = await self._pool.fetch(
            "DELETE FROM turns t USING conversations c"
            " WHERE c.id = t.conversation_id AND c.platform=$1 AND c.channel=$2 AND c.thread=$3 RETURNING t.parts",
            key.platform,
            key.channel,
            key.thread,
        )
        return len(rows), digests_in(row["parts"] for row in rows)

    async def _forget_author(self, platform: str, author_id: str) -> tuple[int, set[str]]:
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                """WITH theirs AS (
                       SELECT t.id, t.conversation_id FROM turns t JOIN conversations c ON c.id = t.conversation_id
                       WHERE c.platform=$1 AND t.role='user' AND t.author_id=$2
                   ), answers AS (
                       SELECT (SELECT n.id FROM turns n WHERE n.conversation_id = th.conversation_id AND n.id > th.id
                               ORDER BY n.id LIMIT 1) AS id FROM theirs th
                   )
                   DELETE FROM turns t WHERE t.id IN (SELECT id FROM theirs)
                       OR (t.role = 'assistant' AND t.id IN (SELECT id FROM answers))
                   RETURNING t.role, t.parts""",
                platform,
                author_id,
            )
            digests = digests_in(row["parts"] for row in rows if row["role"] == "user")
            await connection.execute("DELETE FROM channel_images WHERE platform=$1 AND digest = ANY($2::text[])", platform, list(digests))
        return len(rows), digests

    async def _old_turns(self, before: float, delete: bool) -> int:
        if delete:
            return len(await self._pool.fetch("DELETE FROM turns WHERE created < to_timestamp($1) RETURNING 1", before))
        return await self._pool.fetchval("SELECT count(*) FROM turns WHERE created < to_timestamp($1)", before)

    async def _image_references(self, since: float | None) -> set[str]:
        rows = await self._pool.fetch(
            "SELECT e->>'image' FROM turns t, jsonb_array_elements(t.parts) e"
            " WHERE jsonb_typeof(e) = 'object' AND ($1::float8 IS NULL OR t.created >= to_timestamp($1))"
            " UNION SELECT digest FROM channel_images",
            since,
        )
        return {row[0] for row in rows}

    async def _stored_images(self) -> dict[str, tuple[int, float]]:
        rows = await self._pool.fetch("SELECT digest, octet_length(data), extract(epoch FROM now() - created)::float8 FROM images")
        return {row[0]: (row[1], row[2]) for row in rows}

    async def _delete_images(self, digests: list[str], grace_s: float) -> None:
        # The age is checked again in the statement: an image stored again meanwhile stays.
        await self._pool.execute(
            "DELETE FROM images WHERE digest = ANY($1::text[]) AND created <= now() - make_interval(secs => $2)", digests, grace_s
        )

    async def conversations_in(self, platform: str, channel: str) -> list[ConversationKey]:
        rows = await self._pool.fetch(
            "SELECT c.platform, c.channel, c.thread FROM conversations c WHERE c.platform=$1 AND c.channel=$2"
            " AND EXISTS (SELECT 1 FROM turns t WHERE t.conversation_id = c.id) ORDER BY c.id",
            platform,
            channel,
        )
        return [ConversationKey(row["platform"], row["channel"], row["thread"]) for row in rows]

    async def has_conversation(self, key: ConversationKey) -> bool:
        return await self._pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM turns t JOIN conversations c ON c.id = t.conversation_id"
            " WHERE c.platform=$1 AND c.channel=$2 AND c.thread=$3)",
            key.platform,
            key.channel,
            key.thread,
        )

    # -- images ------------------------------------------------------------------------------

    async def put_image(self, image: ModelImage) -> ImageRef:
        await self._pool.execute(
            # Stored again: a prune running now leaves it alone.
            "INSERT INTO images (digest, data) VALUES ($1, $2) ON CONFLICT (digest) DO UPDATE SET created = now()",
            image.digest,
            image.data,
        )
        return ImageRef(image.digest, image.name)

    async def get_image(self, ref: ImageRef) -> ModelImage:
        data = await self._pool.fetchval("SELECT data FROM images WHERE digest=$1", ref.digest)
        if data is None:
            raise StoreError(f"The image {ref.name} ({ref.digest[:12]}) is missing from the {self.where}.")
        return ModelImage(ref.digest, data, ref.name)

    # -- adapter memories --------------------------------------------------------------------

    async def link_message(self, platform: str, message_id: str, key: ConversationKey) -> None:
        async with self._pool.acquire() as connection:
            conversation = await self._conversation_id(connection, key)
            await connection.execute(
                "INSERT INTO messages (platform, message_id, conversation_id) VALUES ($1, $2, $3)"
                " ON CONFLICT (platform, message_id) DO UPDATE SET conversation_id = EXCLUDED.conversation_id",
                platform,
                message_id,
                conversation,
            )

    async def conversation_of(self, platform: str, message_id: str) -> ConversationKey | None:
        row = await self._pool.fetchrow(
            "SELECT c.platform, c.channel, c.thread FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE m.platform=$1 AND m.message_id=$2",
            platform,
            message_id,
        )
        return ConversationKey(*row) if row else None

    async def claim_event(self, platform: str, event_id: str) -> bool:
        claimed = await self._pool.fetchval(
            "INSERT INTO events (platform, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING true", platform, event_id
        )
        return bool(claimed)

    async def record_feedback(self, turn_id: int, platform: str, user_id: str, vote: str) -> bool:
        recorded = await self._pool.fetchval(
            "INSERT INTO feedback (turn_id, user_id, platform, vote) SELECT id, $2, $3, $4 FROM turns WHERE id=$1"
            " ON CONFLICT (turn_id, user_id) DO UPDATE SET vote = EXCLUDED.vote, at = now() RETURNING true",
            turn_id,
            user_id,
            platform,
            vote,
        )
        return bool(recorded)

    async def feedback_of(self, turn_id: int) -> dict[str, str]:
        rows = await self._pool.fetch("SELECT user_id, vote FROM feedback WHERE turn_id=$1", turn_id)
        return {row["user_id"]: row["vote"] for row in rows}

    async def get_value(self, name: str) -> str | None:
        return await self._pool.fetchval("SELECT value FROM settings WHERE name=$1", name)

    async def set_value(self, name: str, value: str) -> None:
        await self._pool.execute(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", name, value
        )

    async def remember_image(self, platform: str, channel: str, ref: ImageRef) -> None:
        await self._pool.execute(
            "INSERT INTO channel_images (platform, channel, digest, name) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (platform, channel) DO UPDATE SET digest = EXCLUDED.digest, name = EXCLUDED.name, seen = now()",
            platform,
            channel,
            ref.digest,
            ref.name,
        )

    async def last_image(self, platform: str, channel: str) -> ImageRef | None:
        row = await self._pool.fetchrow(
            "SELECT digest, name FROM channel_images WHERE platform=$1 AND channel=$2", platform, channel
        )
        return ImageRef(*row) if row else None
