"""PostgreSQL state shared by several bot processes, on a real server.

Each "process" here is a store (or a whole `Runtime`) of its own: its own connections and sessions,
which is all PostgreSQL sees of a process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import asyncpg
import pytest

from bot.core.engine import Engine
from bot.metrics import Metrics
from bot.runtime.app import Runtime
from bot.runtime.config import load_config
from bot.settings import ConfigError
from bot.state.postgres import SCHEMA_VERSION, PostgresStore, describe_url
from bot.state.store import StoreError
from ground.conversation import Author, ConversationKey, Turn
from ground.messages import Final, IncomingMessage, Partial
from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from tests.conftest import write_config
from tests.postgres import free_port

KEY = ConversationKey("slack", "C1", "1700000000.000100")
ANN = Author("U1", "Ann")


@pytest.fixture
async def stores(postgres_url) -> AsyncIterator[Callable[[], Awaitable[PostgresStore]]]:
    """Opens stores on one database, as separate processes would; closes them all at the end."""
    async with AsyncExitStack() as stack:

        async def open_store() -> PostgresStore:
            store = await PostgresStore.open(postgres_url)
            stack.push_async_callback(store.close)
            return store

        yield open_store


async def until_waiting(url: str, count: int) -> None:
    """Wait (10 s at most) until `count` sessions wait on an advisory lock in the database."""
    connection = await asyncpg.connect(url)
    try:
        query = (
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()"
        )
        async with asyncio.timeout(10):
            while await connection.fetchval(query) < count:  # noqa: ASYNC110 (PostgreSQL's state can only be polled)
                await asyncio.sleep(0.01)
    finally:
        await connection.close()


async def test_two_processes_receiving_the_same_events_claim_each_once(stores):
    first, second = await stores(), await stores()
    events = [f"Ev{n:03}" for n in range(40)]
    claims = await asyncio.gather(*(store.claim_event("slack", event) for event in events for store in (first, second)))
    assert [a + b for a, b in zip(claims[::2], claims[1::2], strict=True)] == [1] * len(events)


async def test_two_processes_take_turns_in_a_conversation_and_see_each_others_turns(stores, postgres_url):
    first, second = await stores(), await stores()

    async def take_a_turn(store: PostgresStore, name: str) -> None:
        # Read, then write what was read: without turn-taking, two of them would read the same count.
        async with store.hold_conversation(KEY):
            seen = len(await store.load_turns(KEY))
            await store.add_turn(KEY, Turn("user", (f"{name} saw {seen}",), Author(name, name)))

    inside, let_go = asyncio.Event(), asyncio.Event()

    async def hold_first() -> None:
        async with first.hold_conversation(KEY):
            inside.set()
            await let_go.wait()
            await first.add_turn(KEY, Turn("user", ("first saw 0",), Author("first", "first")))

    async with asyncio.timeout(20), asyncio.TaskGroup() as tasks:  # a failure here cancels the tasks
        tasks.create_task(hold_first())
        await inside.wait()
        tasks.create_task(take_a_turn(second, "second"))
        await until_waiting(postgres_url, 1)  # the second process waits on the server for the first
        assert await second.load_turns(KEY) == []
        let_go.set()
    assert [turn.text for turn in await first.load_turns(KEY)] == ["first saw 0", "second saw 1"]

    await asyncio.gather(*(take_a_turn(store, name) for _ in range(10) for store, name in ((first, "first"), (second, "second"))))
    seen = [int(turn.text.rpartition(" ")[2]) for turn in await second.load_turns(KEY)]
    assert seen == list(range(22))


async def test_a_lock_is_freed_when_its_holder_or_a_waiter_is_cancelled_or_its_process_dies(stores, postgres_url):
    first, second, third = await stores(), await stores(), await stores()
    inside = asyncio.Event()

    async def hold_forever(store: PostgresStore) -> None:
        async with store.hold_conversation(KEY):
            inside.set()
            await asyncio.Event().wait()

    async def hold_once(store: PostgresStore) -> None:
        async with store.hold_conversation(KEY):
            pass

    async with asyncio.timeout(20), asyncio.TaskGroup() as tasks:
        holder = tasks.create_task(hold_forever(first))
        await inside.wait()
        waiter = tasks.create_task(hold_once(second))
        await until_waiting(postgres_url, 1)
        holder.cancel()
        await waiter

        inside.clear()
        holder = tasks.create_task(hold_forever(first))
        await inside.wait()
        cancelled = tasks.create_task(hold_once(second))
        await until_waiting(postgres_url, 1)
        cancelled.cancel()  # a message deleted while it waited its turn
        waiter = tasks.create_task(hold_once(third))
        holder.cancel()
        await waiter

        inside.clear()
        holder = tasks.create_task(hold_forever(first))
        await inside.wait()
        waiter = tasks.create_task(hold_once(second))
        await until_waiting(postgres_url, 1)
        admin = await asyncpg.connect(postgres_url)
        try:  # the first process's lock connection ends, as it would if the process died
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        finally:
            await admin.close()
        await waiter
        holder.cancel()


async def test_processes_starting_together_set_up_the_schema_once(postgres_url):
    starting = await asyncio.gather(*(PostgresStore.open(postgres_url) for _ in range(4)))
    try:
        async with starting[0]._pool.acquire() as connection:
            assert await connection.fetch("SELECT version FROM schema_version ORDER BY version") == [
                (n + 1,) for n in range(SCHEMA_VERSION)
            ]
    finally:
        await asyncio.gather(*(store.close() for store in starting))
    again = await PostgresStore.open(postgres_url)
    await again.close()


async def test_a_newer_schema_is_refused(postgres_url, stores):
    await stores()
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute("INSERT INTO schema_version (version) VALUES ($1)", SCHEMA_VERSION + 1)
    finally:
        await connection.close()
    with pytest.raises(
        StoreError, match=rf"written by a newer idefics-bot \(schema {SCHEMA_VERSION + 1}, this one knows {SCHEMA_VERSION}\)"
    ):
        await PostgresStore.open(postgres_url)


async def test_a_database_that_other_software_uses_is_left_alone(postgres_url):
    connection = await asyncpg.connect(postgres_url)
    try:
        await connection.execute("CREATE TABLE turns (id serial PRIMARY KEY, move text)")
        with pytest.raises(
            StoreError,
            match=r"can't be set up for idefics-bot \(relation \"turns\" already exists\)\. Give idefics-bot a database",
        ):
            await PostgresStore.open(postgres_url)
        assert await connection.fetchval("SELECT to_regclass('schema_version') IS NULL AND to_regclass('images') IS NULL")
    finally:
        await connection.close()


async def test_start_up_errors_name_the_database_and_what_to_do_but_never_the_password(postgres_server):
    port = free_port()
    cases = [
        (
            postgres_server.url("postgres", password="wrong-password"),
            "refused the password for the database postgres on 127.0.0.1",
        ),
        (postgres_server.url("no_such_db"), rf"on 127.0.0.1:{postgres_server.port} has no database no_such_db. Create it"),
        (
            f"postgresql://idefics:hunter2@127.0.0.1:{port}/idefics",
            rf"can't be reached for the database idefics on 127.0.0.1:{port} as idefics",
        ),
    ]
    for url, message in cases:
        with pytest.raises(StoreError, match=message) as raised:
            await PostgresStore.open(url)
        assert postgres_server.password not in str(raised.value) and "hunter2" not in str(raised.value)


def test_the_url_is_described_without_its_password():
    assert describe_url("postgresql://bot:s3cret@db.example:5433/state") == "database state on db.example:5433 as bot"
    assert describe_url("postgres:///state?host=/run/postgresql") == "database state on /run/postgresql as the default user"


def test_the_url_selects_postgresql_and_may_come_from_the_environment(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[state]\nmax_connections = 8\n")
    url = "postgresql://bot:s3cret@db.example/state"
    config = load_config(path, environ={"DATABASE_URL": url})
    assert config.state.url.get_secret_value() == url and "s3cret" not in repr(config)
    assert config.state.max_connections == 8 and "s3cret" not in repr(PostgresStore(config.state.url.get_secret_value()))
    assert load_config(path, environ={}).state.url is None  # the SQLite file then

    path.write_text('[state]\nurl = "mysql://bot:s3cret@db.example/state"\n')
    with pytest.raises(ConfigError, match=r"\[state\]: url must be a postgresql:// URL") as raised:
        load_config(path, environ={})
    assert "s3cret" not in str(raised.value)


class PromptRecorder(LocalBackend):
    """The real tiny model, noting the prompt of every request it is given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts: list[str] = []

    async def stream(self, request):
        self.prompts.append("".join(item for item in self.render(request.prompt) if isinstance(item, str)))
        async for event in super().stream(request):
            yield event


async def test_two_bot_processes_answer_one_conversation_in_order_each_seeing_the_others_turns(
    tmp_path, tiny_checkpoint, postgres_url
):
    config = write_config(
        tmp_path / "config.toml",
        f'[model]\ncheckpoint = "{tiny_checkpoint}"\n[generation]\nmax_new_tokens = 12\n[limits]\nper_user_burst = 100\n'
        f'[state]\nurl = "{postgres_url}"\n',
    )

    async def model() -> LocalBackend:
        return await PromptRecorder.open(CheckpointSettings(str(tiny_checkpoint)), BatchSettings(max_batch_size=4))

    async with Runtime.open(config, model=await model()) as first, Runtime.open(config, model=await model()) as second:
        assert isinstance(first.store, PostgresStore) and first.store is not second.store
        one = first.engine.reply(IncomingMessage(KEY, ANN, "Question one", message_id="m1"))
        async with asyncio.timeout(60), asyncio.TaskGroup() as tasks:
            async for event in one:  # the first process is answering: it holds the conversation
                if isinstance(event, Partial):
                    break
            two = tasks.create_task(last_event(second.engine.reply(IncomingMessage(KEY, ANN, "Question two", message_id="m2"))))
            await until_waiting(postgres_url, 1)
            assert not second.model.prompts  # the second waits its turn
            answer_one = await last_event(one)
        answer_two = two.result()
        answer_three = await last_event(first.engine.reply(IncomingMessage(KEY, ANN, "Question three", message_id="m3")))
        answers = [answer_one, answer_two, answer_three]
        assert all(isinstance(answer, Final) and answer.text for answer in answers)

        assert "Question one" in second.model.prompts[0] and answer_one.text.strip() in second.model.prompts[0]
        assert "Question two" in first.model.prompts[1] and answer_two.text.strip() in first.model.prompts[1]
        turns = await second.store.load_turns(KEY)
        assert [turn.text for turn in turns] == [
            text for n, answer in zip(("one", "two", "three"), answers, strict=True) for text in (f"Question {n}", answer.text)
        ]


async def last_event(events):
    return [event async for event in events][-1]


async def test_the_per_user_rate_limit_is_one_bucket_for_every_process(stores):
    """Two processes taking a person's requests at once: the burst is granted once in all, not once
    per process (one atomic statement per take)."""
    first, second = await stores(), await stores()
    buckets = [first.request_buckets(per_minute=1, burst=5), second.request_buckets(per_minute=1, burst=5)]
    waits = await asyncio.gather(*(buckets[n % 2].take("slack:U1") for n in range(20)))
    assert sorted(waits)[:5] == [0.0] * 5 and all(55 < wait <= 60 for wait in sorted(waits)[5:]), waits
    assert await buckets[1].take("slack:U2") == 0.0  # another person has a bucket of their own


async def test_two_processes_tell_a_person_over_the_rate_to_wait(stores, config, backend):
    limits = config.limits.model_copy(update={"per_user_per_minute": 1.0, "per_user_burst": 2})
    settings = config.model_copy(update={"limits": limits})
    engines = [Engine(settings, backend, await stores(), Metrics()) for _ in range(2)]
    finals = []
    for number in range(3):
        message = IncomingMessage(ConversationKey("slack", f"C{number}"), ANN, "hello")
        finals.append([event async for event in engines[number % 2].reply(message) if isinstance(event, Final)][-1])
    assert finals[0].text and finals[1].text
    assert finals[2].text == "" and finals[2].notes[0].startswith("You're sending requests faster than I can answer. Please try again in")
