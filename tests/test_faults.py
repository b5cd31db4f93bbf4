"""Fault survival, end to end: the bot as `idefics-bot run` starts it (`run_bot`), on the real local
backend with the tiny checkpoint, against the fake Slack and the fake Discord on 127.0.0.1, while
things break: the model raises on one request, or runs out of memory above a batch size; Slack
answers 429 and 5xx in bursts, or never takes a reply; Discord's REST API fails, and its gateway
asks for reconnection after reconnection or goes away. Each test ends with every user answered
(or, where the platform never takes the reply, the loss logged with its conversation) and the
store whole. The health endpoint follows the adapters' connections.

Faults in the model come from a thin wrapper around the real transformers model that the backend
loads (`FaultyModel`); the rest from the fakes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import aiohttp
import pytest
import torch

import model.local
from bot.runtime.config import Config
from bot.state.store import SQLiteStore
from ground.conversation import Author, ConversationKey, Turn
from tests.bots import BotRun, Harness, bot_says, discord_connected, discord_section, free_port, logged, slack_settings, slack_started, thread_of
from tests.conftest import write_config
from tests.fake_discord import FakeDiscord, RestFailure
from tests.fake_slack import APP_TOKEN, Failure, FakeSlack
from tests.model_tap import ModelTap

APOLOGY = "Sorry, the model could not answer this one (it hit an internal error). Please try again."


class FaultyModel:
    """The real transformers model, with faults on demand: a forward raises a CUDA-like error when it
    prefills a prompt that contains `poison`, and `torch.OutOfMemoryError` for more than `max_rows`
    rows. `calls` records each prefill's rows and outcome ("ok", "error", "oom")."""

    def __init__(self, model, tokenizer):
        self.inner = model
        self.tokenizer = tokenizer
        self.poison: str | None = None
        self.max_rows: int | None = None
        self.calls: list[tuple[int, str]] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, input_ids: torch.Tensor, **inputs):
        rows, prefill = input_ids.shape[0], input_ids.shape[1] > 1
        outcome = "ok"
        if self.max_rows is not None and rows > self.max_rows:
            outcome = "oom"
        elif prefill and self.poison and any(self.poison in self.tokenizer.decode(row) for row in input_ids):
            outcome = "error"
        if prefill:
            self.calls.append((rows, outcome))
        if outcome == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB for a batch of {rows}")
        if outcome == "error":
            raise RuntimeError("CUDA error: device-side assert triggered")
        return self.inner(input_ids=input_ids, **inputs)


@pytest.fixture
def faulty(monkeypatch) -> Iterator[list[FaultyModel]]:
    """Every model the local backend loads comes wrapped in a `FaultyModel` (listed here)."""
    wrapped: list[FaultyModel] = []
    load = model.local.load_checkpoint

    def load_faulty(settings):
        loaded, processor = load(settings)
        wrapped.append(FaultyModel(loaded, processor.tokenizer))
        return wrapped[-1], processor

    monkeypatch.setattr(model.local, "load_checkpoint", load_faulty)
    yield wrapped


def bot_config(tmp_path: Path, checkpoint: Path, *, slack: FakeSlack | None = None, toml: str = "", **slack_keys) -> Config:
    """The bot on the tiny checkpoint with its state in `tmp_path`; [slack] on `slack` if given; more TOML in `toml`."""
    section = ""
    if slack is not None:
        section = "[slack]\n" + "\n".join(f"{key} = {json.dumps(value)}" for key, value in slack_settings(slack, **slack_keys).items())
    return write_config(
        tmp_path / "bot.toml",
        f"""
[model]
checkpoint = "{checkpoint}"
[generation]
max_new_tokens = 24
[limits]
per_user_per_minute = 0
[state]
path = "{tmp_path / 'state' / 'bot.sqlite3'}"
{toml}
{section}
""",
    )


def stored_conversations(path: Path) -> dict[ConversationKey, list[str]]:
    """The roles of each conversation's turns in the SQLite state, once the file passed SQLite's
    integrity check and every turn's parts read back."""
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = db.execute(
            "SELECT c.platform, c.channel, c.thread, t.role, t.parts FROM turns t JOIN conversations c ON c.id = t.conversation_id ORDER BY t.id"
        ).fetchall()
    finally:
        db.close()
    conversations: dict[ConversationKey, list[str]] = {}
    for platform, channel, thread, role, parts in rows:
        assert isinstance(json.loads(parts), list)
        conversations.setdefault(ConversationKey(platform, channel, thread), []).append(role)
    return conversations


def assert_whole(conversations: dict[ConversationKey, list[str]]) -> None:
    """Every conversation is questions each followed by its answer: no half turns."""
    for key, roles in conversations.items():
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), (key, roles)


@pytest.fixture
async def slack() -> Iterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake
    assert not fake.unexpected


@pytest.fixture
async def fake() -> Iterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server
    assert server.unknown == []


@pytest.fixture
async def logs():
    with logged("adapters") as adapters, logged("model") as model_logs:
        yield adapters, model_logs


async def start_slack(config: Config, slack: FakeSlack, logs, tap: ModelTap) -> tuple[BotRun, Harness]:
    run = await BotRun(config).start(slack_started(logs[0]))
    return run, Harness(slack, config, logs[0], tap)


async def in_line(slack: FakeSlack, channels: list[str]) -> None:
    """Wait until the reply in each of `channels` shows its place in the model's queue."""

    def shown(calls) -> bool:
        lines = {c.params.get("channel") for c in calls if c.method == "chat.update" and "in line" in c.params.get("text", "")}
        return lines >= set(channels)

    await slack.calls.wait_for(shown)


def final_texts(slack: FakeSlack, channel: str) -> list[str]:
    return [message.text for message in slack.messages.values() if message.channel == channel]


# -- the model -------------------------------------------------------------------------------


async def test_a_request_that_makes_the_model_raise_gets_an_apology_and_its_batch_is_answered(tmp_path, tiny_checkpoint, slack, logs, tap, faulty):
    config = bot_config(tmp_path, tiny_checkpoint, slack=slack)
    run, harness = await start_slack(config, slack, logs, tap)
    try:
        model_ = faulty[0]
        model_.poison = "kaboom"
        tap.gate.clear()  # the model is busy with a first question while the others arrive
        first = await harness.send(slack.mention("C0", "U0", "first"))
        await tap.wait_held()
        people = {f"C{n}": f"U{n}" for n in range(1, 5)}
        events = {
            channel: await harness.send(slack.mention(channel, user, "kaboom" if channel == "C3" else f"hello {user}")) for channel, user in people.items()
        }
        await in_line(slack, list(people))
        tap.gate.set()
        for event_id in [first, *events.values()]:
            await harness.outcome(event_id)
    finally:
        await run.stop()

    assert model_.calls[1] == (4, "error")  # the four waiting questions went in one batch, which failed
    assert tap.backend.batch_sizes == [1, 4]
    assert final_texts(slack, "C3") == [f"_{APOLOGY}_"]
    for channel in ("C0", "C1", "C2", "C4"):
        [answer] = final_texts(slack, channel)
        assert answer and "Sorry" not in answer and "Thinking" not in answer
    conversations = stored_conversations(tmp_path / "state" / "bot.sqlite3")
    assert_whole(conversations)
    assert {key.channel for key in conversations} == {"C0", "C1", "C2", "C4"}  # the failed question was taken back


async def test_out_of_memory_lowers_the_token_budget_and_the_configured_budget_comes_back(tmp_path, tiny_checkpoint, slack, logs, tap, faulty):
    config = bot_config(tmp_path, tiny_checkpoint, slack=slack)  # max_batch_size = 64, max_batch_tokens = 16384
    run, harness = await start_slack(config, slack, logs, tap)
    model_logs = logs[1]
    backend = tap.backend
    backend.batching = dataclasses.replace(backend.batching, recover_after=2)  # answers before the budget doubles

    async def burst(channels: list[str]) -> None:
        """A question held in the model while one per channel queues up; then all are answered."""
        tap.gate.clear()
        first = await harness.send(slack.mention("C0", "U0", "first"))
        await tap.wait_held()
        tap.held.clear()
        events = [await harness.send(slack.mention(channel, "U1", f"question in {channel}")) for channel in channels]
        await in_line(slack, channels)
        tap.gate.set()
        for event_id in [first, *events]:
            await harness.outcome(event_id)

    try:
        model_ = faulty[0]
        model_.max_rows = 2  # more rows than this: out of memory
        await burst([f"C{n}" for n in range(1, 9)])
        lowered = [r.tokens for r in model_logs.items if r.msg == "batch.budget_lowered"]
        assert lowered and lowered == sorted(lowered, reverse=True) and lowered[-1] < 16384
        assert model_.calls[1] == (8, "oom")  # the eight waiting joined the first question at once
        assert all(rows <= 2 for rows, outcome in model_.calls if outcome == "ok")
        for n in range(1, 9):
            [answer] = final_texts(slack, f"C{n}")
            assert answer and "Sorry" not in answer

        model_.max_rows = None  # the memory is there again
        for n in range(9, 30):  # the budget doubles every two answers
            await harness.answer(slack.mention(f"C{n}", "U1", "one more"))
            if any(r.msg == "batch.budget_raised" and r.tokens == 16384 for r in model_logs.items):
                break
        sizes, calls = len(backend.batch_sizes), len(model_.calls)
        await burst([f"D{n}" for n in range(1, 9)])
    finally:
        await run.stop()
    # The whole budget is back: the eight join the first question at once.
    assert max(backend.batch_sizes[sizes:]) == 9 and (8, "ok") in model_.calls[calls:]
    assert_whole(stored_conversations(tmp_path / "state" / "bot.sqlite3"))


# -- Slack -------------------------------------------------------------------------------------


async def test_slack_429_and_5xx_bursts_answer_everyone_once(tmp_path, tiny_checkpoint, slack, logs, tap):
    config = bot_config(tmp_path, tiny_checkpoint, slack=slack)
    run, harness = await start_slack(config, slack, logs, tap)
    try:
        slack.fail(
            "chat.postMessage",
            Failure(429, "ratelimited", retry_after=1, channel="C1"),
            Failure(500, after=True, channel="C1"),  # Slack posted it, then failed: posting again would show it twice
            Failure(503, "service_unavailable", channel="C2"),
            Failure(500, "fatal_error", after=True, channel="C2"),
            Failure(500, channel="C3"),
        )
        slack.fail(
            "chat.update",
            Failure(500, channel="C1"),
            Failure(502, "bad_gateway", channel="C1"),
            Failure(429, "ratelimited", retry_after=1, channel="C3"),
            Failure(503, "service_unavailable", channel="C3"),
            Failure(500, channel="C4"),
        )
        mentions = [slack.mention(f"C{n}", f"U{n}", f"question {n}") for n in range(1, 5)]
        sent = [await harness.send(mention) for mention in mentions]
        for event_id in sent:
            await harness.outcome(event_id)
    finally:
        await run.stop()

    assert not slack.failures["chat.postMessage"] and not slack.failures["chat.update"]  # every fault happened
    assert len(slack.failed.items) == 10
    assert sum(r.msg == "slack.post_found" for r in logs[0].items) == 2  # the two posts that went through despite a 500
    for mention in mentions:
        [reply] = slack.thread(mention["channel"], mention["ts"])  # one message each: nothing shown twice
        assert reply.text and "Thinking" not in reply.text
    assert not [r for r in logs[0].items if r.levelno >= logging.ERROR]
    conversations = stored_conversations(tmp_path / "state" / "bot.sqlite3")
    assert_whole(conversations)
    assert len(conversations) == 4


async def test_a_reply_slack_never_takes_is_logged_with_its_conversation(tmp_path, tiny_checkpoint, slack, logs, tap):
    config = bot_config(tmp_path, tiny_checkpoint, slack=slack)
    run, harness = await start_slack(config, slack, logs, tap)
    try:
        slack.fail("chat.update", Failure(500, channel="C1", lasting=True))  # Slack is broken for this channel
        lost = slack.mention("C1", "U1", "will you answer?")
        fine = slack.mention("C2", "U2", "and me?")
        await harness.send(lost)
        await harness.answer(fine)
        record = await logs[0].wait_for(lambda records: next((r for r in records if r.msg == "slack.reply_lost"), None))
    finally:
        await run.stop()
    assert record.conversation == f"slack:C1:{lost['ts']}" and record.error == "internal_error" and record.levelno == logging.ERROR
    assert len([f for f in slack.failed.items if f[0] == "chat.update"]) == 4  # the first try and three more
    [answer] = slack.thread("C2", fine["ts"])
    assert answer.text and "Thinking" not in answer.text


async def test_slash_command_answers_wait_out_a_429_and_one_slack_refuses_is_logged(tmp_path, tiny_checkpoint, slack, logs, tap):
    config = bot_config(tmp_path, tiny_checkpoint, slack=slack)
    run, harness = await start_slack(config, slack, logs, tap)

    async def command(text: str) -> str:
        delivery, response_id = await slack.command(harness.endpoint, text, channel="C1")
        assert delivery.status == 200
        return response_id

    async def response(response_id: str) -> dict:
        return await slack.responses.wait_for(lambda items: next((body for rid, body in items if rid == response_id), None))

    try:
        slack.fail("response_url", Failure(429, "rate_limited", retry_after=1))
        waited = await command("reset")
        assert (await response(waited))["text"].startswith("There was nothing to forget")

        slack.fail("response_url", Failure(500, "internal_error"))
        await command("caption")  # no image seen in C1 yet: the answer says so, and Slack refuses it
        record = await logs[0].wait_for(lambda records: next((r for r in records if r.msg == "slack.reply_lost"), None))
        assert record.conversation == "slack:C1" and record.command == "caption" and record.error == "HTTP 500: internal_error"

        after = await command("reset")
        await response(after)
    finally:
        await run.stop()
    assert [(method, status) for method, status, _ in slack.failed.items] == [("response_url", 429), ("response_url", 500)]
    assert [rid for rid, _ in slack.responses.items] == [waited, after]  # the refused answer was not posted again
    assert record.levelno == logging.ERROR

# -- Discord -----------------------------------------------------------------------------------


def discord_config(tmp_path: Path, checkpoint: Path, fake: FakeDiscord, **settings) -> Config:
    config = bot_config(tmp_path, checkpoint)
    return config.model_copy(update={"discord": discord_section(fake, **settings)})


def echo(prompt: str) -> str:
    """A reply naming the question it answers (the last one in the prompt)."""
    return "answer to " + re.findall(r"(question \d+|follow-up \d+)", prompt)[-1]


async def test_a_reconnect_storm_answers_every_message_exactly_once(tmp_path, tiny_checkpoint, fake, logs, tap):
    fake.replay_overlap = 2  # each RESUME replays two events the bot already had, as a sloppy gateway might
    tap.say = echo
    run = await BotRun(discord_config(tmp_path, tiny_checkpoint, fake)).start(discord_connected(fake))
    people = [fake.user(name) for name in ("Ann", "Bob", "Cat", "Dan")]
    resumes = 0

    async def storm_while(say) -> dict:
        """Ask for a reconnection, say something while the bot reconnects, and wait until it resumed."""
        nonlocal resumes
        await fake.reconnect()
        said = await say()
        resumes += 1
        await fake.wait_for(lambda: fake.sessions.count("resume") == resumes)
        return said

    try:
        threads = []
        for n, person in enumerate(people):
            question = await storm_while(partial(fake.say, person, fake.text_channel, f"question {n}", mention=True))
            threads.append(await thread_of(fake, question))
        tap.gate.clear()  # answers in flight across the reconnections
        for n, (person, thread) in enumerate(zip(people, threads)):
            await storm_while(partial(fake.say, person, thread, f"follow-up {n}"))
        tap.gate.set()
        for n, thread in enumerate(threads):
            await bot_says(fake, thread, tap.spelled(f"answer to follow-up {n}"))
    finally:
        await run.stop()

    assert fake.sessions == ["identify"] + ["resume"] * 8
    for n, thread in enumerate(threads):
        assert fake.bot_texts(thread["id"]) == [tap.spelled(f"answer to question {n}"), tap.spelled(f"answer to follow-up {n}")]
    assert len(tap.prompts) == 8  # each question went to the model once
    assert any(r.msg == "discord.duplicate" for r in logs[0].items)  # replays came, and were dropped
    conversations = stored_conversations(tmp_path / "state" / "bot.sqlite3")
    assert_whole(conversations)
    assert len(conversations) == 4 and all(len(roles) == 4 for roles in conversations.values())


async def test_discord_rest_errors_are_retried_without_duplicates_and_a_lost_reply_is_logged(tmp_path, tiny_checkpoint, fake, logs, tap):
    tap.say = echo
    ann, bob = fake.user("Ann"), fake.user("Bob")
    anns, bobs = fake.dm_channel(ann), fake.dm_channel(bob)
    fake.rest_failures += [
        RestFailure("POST", f"/channels/{anns['id']}/messages", 500, after=True),  # created, then 500: discord.py sends it again
        RestFailure("POST", f"/channels/{anns['id']}/messages", 429),
        RestFailure("POST", f"/channels/{bobs['id']}/messages", 403, 50013, "Missing Permissions", lasting=True),
    ]
    run = await BotRun(discord_config(tmp_path, tiny_checkpoint, fake)).start(discord_connected(fake))
    try:
        await fake.say(bob, bobs, "question 2")
        await fake.say(ann, anns, "question 1")
        await bot_says(fake, anns, tap.spelled("answer to question 1"))
        lost = await logs[0].wait_for(lambda records: next((r for r in records if r.msg == "discord.reply_lost"), None))
    finally:
        await run.stop()
    assert len(fake.bot_messages(anns["id"])) == 1  # the retried post did not show twice
    assert sorted(call.path for call in fake.failed) == sorted([f"/channels/{anns['id']}/messages"] * 2 + [f"/channels/{bobs['id']}/messages"])
    assert lost.conversation == f"discord:{bobs['id']}" and lost.status == 403 and lost.code == 50013
    assert_whole(stored_conversations(tmp_path / "state" / "bot.sqlite3"))


# -- seeing it ---------------------------------------------------------------------------------


async def test_healthz_follows_the_connections_and_metrics_count_adapter_events(tmp_path, tiny_checkpoint, fake, slack, logs, tap):
    port = free_port()
    config = bot_config(tmp_path, tiny_checkpoint, slack=slack, toml=f'[health]\nenabled = true\nport = {port}\n', mode="socket", app_token=APP_TOKEN)
    config = config.model_copy(update={"discord": discord_section(fake)})
    run = await BotRun(config).start(discord_connected(fake), slack_started(logs[0]))
    harness = Harness(slack, config, logs[0], tap)
    base = f"http://127.0.0.1:{port}"

    async def over_the_socket(kind: str, payload: dict) -> dict:
        """Send a Socket Mode envelope and wait for the bot's acknowledgement."""
        envelope_id = await slack.push(kind, payload)
        return await slack.acks.wait_for(lambda acks: next((a for a in acks if a["envelope_id"] == envelope_id), None))

    async def health(http: aiohttp.ClientSession) -> tuple[int, dict]:
        async with http.get(f"{base}/healthz") as response:
            return response.status, await response.json()

    try:
        async with aiohttp.ClientSession() as http:
            assert await health(http) == (200, {"ok": True, "model": {"loaded": True, "worker_alive": True}, "adapters": {"discord": True, "slack": True}})

            body = slack.envelope(slack.mention("C1", "U1", "hello"))
            await over_the_socket("events_api", body)
            await harness.outcome(body["event_id"])
            await over_the_socket("events_api", body)  # delivered again
            await harness.outcome(body["event_id"], "slack.duplicate")
            chatting = slack.envelope(slack.message("C1", "U1", "just chatting"))
            await over_the_socket("events_api", chatting)
            await harness.outcome(chatting["event_id"], "slack.ignored")
            await over_the_socket("slash_commands", slack.command_payload("help", channel="C1", user="U1", command="/idefics", response_id="R1"))
            ann = fake.user("Ann")
            await bot_says(fake, await thread_of(fake, await fake.say(ann, fake.text_channel, "hello", mention=True)), "", exactly=False)
            await fake.say(ann, fake.text_channel, "not for the bot")
            interaction = await fake.run_command(ann, fake.text_channel, "reset")
            await fake.wait_for(lambda: interaction.original)
            async with http.get(f"{base}/metrics") as response:
                metrics = await response.text()
            for adapter, kind, count in [
                ("slack", "message", 1), ("slack", "duplicate", 1), ("slack", "ignored", 1), ("slack", "command", 1),
                ("discord", "message", 1), ("discord", "ignored", 1), ("discord", "command", 1),
            ]:  # fmt: skip
                assert f'idefics_adapter_events_total{{adapter="{adapter}",kind="{kind}"}} {count:.1f}' in metrics, (adapter, kind)

            fake.gateway_open = False  # Discord goes away, and stays away for a while
            await fake.drop()
            await fake.wait_for(lambda: fake.refused_connections)
            status, body = await health(http)
            assert status == 503 and body["adapters"] == {"discord": False, "slack": True} and body["ok"] is False
            fake.gateway_open = True
            await logs[0].wait_for(lambda records: any(r.msg == "discord.resumed" for r in records))
            assert await health(http) == (200, {"ok": True, "model": {"loaded": True, "worker_alive": True}, "adapters": {"discord": True, "slack": True}})
    finally:
        await run.stop()


async def test_discord_answers_what_a_killed_process_left_unanswered_where_it_was_asked(tmp_path, tiny_checkpoint, fake, logs, tap):
    config = discord_config(tmp_path, tiny_checkpoint, fake)
    ann, bob, cat = fake.user("Ann"), fake.user("Bob"), fake.user("Cat")
    # What a process killed while answering leaves: questions stored without their answers (the bot is
    # not connected, so these messages reach no one now).
    post, in_forum = await fake.start_forum_post(ann, "Which breed?", "which breed is this?", mention=True)
    dm = fake.dm_channel(bob)
    in_dm = await fake.say(bob, dm, "hello?")
    inline = await fake.say(cat, fake.text_channel, "what is this?", mention=True)
    left = {
        ConversationKey("discord", fake.forum["id"], post["id"]): (ann, in_forum),
        ConversationKey("discord", dm["id"]): (bob, in_dm),
        ConversationKey("discord", fake.text_channel["id"], inline["id"]): (cat, inline),
    }
    # It had begun the inline answer: that message is edited into the whole one.
    channel = fake.text_channel
    reference = {"message_id": inline["id"], "channel_id": channel["id"], "guild_id": channel["guild_id"]}
    begun = fake._message(channel["id"], fake.bot, "The late", type=19, message_reference=reference, referenced_message=inline)
    store = await SQLiteStore.open(config.state.path)
    for key, (person, message) in left.items():
        await store.add_turn(key, Turn("user", (message["content"],), Author(person["id"], person["global_name"]), message["id"]), answerer="killed")
    await store.record_reply("discord", inline["id"], [begun["id"]])
    await store.close()

    tap.say = "the late answer"
    run = await BotRun(config).start(discord_connected(fake))
    try:
        await logs[0].wait_for(lambda records: len([r for r in records if r.msg == "discord.resumed"]) == 3)
    finally:
        await run.stop()
    late = f"{tap.spelled('the late answer')}\n\n*I was restarted while writing this answer, so it comes late.*"
    assert fake.bot_texts(post["id"]) == [late] and fake.bot_texts(dm["id"]) == [late]
    [reply] = fake.bot_messages(fake.text_channel["id"])
    assert reply["id"] == begun["id"] and reply["content"] == late and str(reply["message_reference"]["message_id"]) == inline["id"]
    assert len(tap.prompts) == 3
    assert_whole(stored_conversations(config.state.path))
