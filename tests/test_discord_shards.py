"""A sharded Discord bot: two processes (two `run_bot`s, each with its own model and discord.py client)
run shards 0 and 1 of 2 against one fake Discord, sharing their state in PostgreSQL as in production.

Each process's model has a `ModelTap` of its own, so the test sees which process answered what.
"""

from __future__ import annotations

import re

import discord
import pytest
from pydantic import SecretStr

from adapters.discord.adapter import SHARDING_REQUIRED
from bot.runtime.config import Config
from bot.settings import ConfigError
from tests.bots import BotRun, bot_says, discord_connected, discord_section, thread_of
from tests.conftest import write_config
from tests.fake_discord import FakeDiscord
from tests.model_tap import ModelTap, tapping
from tests.test_discord import no_errors  # noqa: F401 (autouse: discord.py and the adapter log no errors)


@pytest.fixture
async def start_process(config: Config):
    """Starts a bot process on a fake Discord ([discord] settings as keywords), with its state in the
    PostgreSQL database `postgres_url` if given, and returns it with a tap on its own model. Those
    still running at the end are stopped."""
    runs: list[BotRun] = []

    async def start(fake: FakeDiscord, postgres_url: str | None = None, **discord) -> tuple[BotRun, ModelTap]:
        state = config.state.model_copy(update={"url": SecretStr(postgres_url)}) if postgres_url else config.state
        with tapping(ModelTap()) as tap:  # the process makes its model as it starts
            run = BotRun(config.model_copy(update={"discord": discord_section(fake, **discord), "state": state}))
            runs.append(run)
            await run.start(discord_connected(fake))
        return run, tap

    yield start
    for run in runs:
        if run.task is not None and not run.task.done():
            await run.stop()


async def test_two_processes_split_the_guilds_by_shard_and_share_the_conversations(start_process, postgres_url):
    async with FakeDiscord() as fake:
        zero, one = fake.add_guild("Shard zero", (0, 2)), fake.add_guild("Shard one", (1, 2))
        first, first_tap = await start_process(fake, postgres_url, shard_count=2, shard_ids=[0])
        second, second_tap = await start_process(fake, postgres_url, shard_count=2, shard_ids=[1])
        assert fake.identified_shards == [[0, 2], [1, 2]]
        ann, bob = fake.user("Ann"), fake.user("Bob")

        zeros = first_tap.force_next("the answer from shard zero")
        ones = second_tap.force_next("the answer from shard one")
        in_zero = await thread_of(fake, await fake.say(ann, zero, "what about guild zero?", mention=True))
        in_one = await thread_of(fake, await fake.say(bob, one, "what about guild one?", mention=True))
        await bot_says(fake, in_zero, zeros)
        await bot_says(fake, in_one, ones)
        dm = fake.dm_channel(ann)
        direct = first_tap.force_next("a direct answer")  # DMs come on shard 0
        await fake.say(ann, dm, "a direct question")
        await bot_says(fake, dm, direct)

        # A rolling restart: a new process takes over shard 1 and continues its conversation.
        await second.stop()
        third, third_tap = await start_process(fake, postgres_url, shard_count=2, shard_ids=[1])
        again = third_tap.force_next("a later answer")
        await fake.say(bob, in_one, "and then?")
        await bot_says(fake, in_one, again)
        await first.stop()
        await third.stop()  # every reply is posted by now: the processes drained before stopping

        # Each process answered only its shards' messages.
        assert [len(tap.prompts) for tap in (first_tap, second_tap, third_tap)] == [2, 1, 1]
        assert "what about guild zero?" in first_tap.prompt(0) and "a direct question" in first_tap.prompt(1)
        assert "what about guild one?" in second_tap.prompt(0)
        later = third_tap.prompt(0)
        assert later.index("[Bob] what about guild one?") < later.index(f"Assistant: {ones}") < later.index("[Bob] and then?")
        assert fake.bot_texts(in_zero["id"]) == [zeros] and fake.bot_texts(dm["id"]) == [direct]
        assert fake.bot_texts(in_one["id"]) == [ones, again]  # each message answered once, by one process
        assert fake.unknown == []
    # Both processes pointed discord.py at the fake; the last to stop put Discord's addresses back.
    assert discord.http.Route.BASE == "https://discord.com/api/v10"
    assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == "wss://gateway.discord.gg/"


async def test_a_bot_discord_wants_sharded_is_told_to_set_shard_count(start_process):
    async with FakeDiscord(shards_required=2) as fake:
        with pytest.raises(ConfigError, match=re.escape(SHARDING_REQUIRED)):
            await start_process(fake)


@pytest.mark.parametrize(
    "section, message",
    [
        ("shard_ids = [0]", r"shard_ids needs shard_count"),
        ("shard_count = 2\nshard_ids = [0, 2]", r"shard_ids \[2\] are not shards of shard_count = 2: shard ids go from 0 to 1"),
        ("shard_count = 2\nshard_ids = []", r"shard_ids is empty"),
        ("shard_count = 0", r"\[discord\] shard_count: Input should be greater than or equal to 1"),
    ],
)
def test_shard_settings_are_checked(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        write_config(tmp_path / "config.toml", f'[discord]\ntoken = "t"\n{section}\n')


async def test_after_a_kill_only_the_process_of_the_shard_answers_what_was_left(start_process, postgres_url):
    from bot.state.postgres import PostgresStore
    from ground.conversation import Author, ConversationKey, Turn
    from tests.bots import logged

    async with FakeDiscord() as fake:
        one = fake.add_guild("Shard one", (1, 2))
        bob = fake.user("Bob")
        question = await fake.say(bob, one, "what is left?", mention=True)  # no bot is connected yet
        key = ConversationKey("discord", one["id"], question["id"])
        store = await PostgresStore.open(postgres_url)
        await store.add_turn(key, Turn("user", (question["content"],), Author(bob["id"], "Bob"), question["id"]), answerer="killed")
        await store.close()

        with logged() as logs:
            zero, zero_tap = await start_process(fake, postgres_url, shard_count=2, shard_ids=[0])
            await logs.wait_for(lambda records: any(r.msg == "discord.resume_skipped" for r in records))
            first, first_tap = await start_process(fake, postgres_url, shard_count=2, shard_ids=[1])
            await fake.wait_for(lambda: fake.bot_messages(one["id"]))
            await zero.stop()
            await first.stop()
        skipped = next(r for r in logs.items if r.msg == "discord.resume_skipped")
        assert skipped.reason == "another process's shard"
        assert zero_tap.prompts == []  # the process of shard 0 never worked on it
        assert "what is left?" in first_tap.prompt(0)
        [answer] = fake.bot_messages(one["id"])  # the processes drained before stopping: it is final
        assert answer["content"].endswith("*The bot process that was writing this answer stopped, so another one took it over: it comes late.*")
