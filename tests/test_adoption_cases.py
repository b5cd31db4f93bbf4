"""What adoption must get right besides the plain case (tests/test_adoption.py), each with real
`idefics-bot run` processes on one PostgreSQL database, one of them killed (`kill -9`) and never
started again: a follow-up that reached another process while the question before it was being
answered, a long adopted answer, and two processes that find the same stranded question at once.
The test acts as Slack (tests/fake_slack.py); the model is the fake TGI server."""

from __future__ import annotations

import asyncio
import signal

import asyncpg

from adapters.slack.blocks import STOP
from bot.state.postgres import PostgresStore
from ground.conversation import ConversationKey
from tests.adoption import write_config
from tests.fake_slack import FakeSlack, Posted
from tests.fake_tgi import FakeTGI, Reply
from tests.test_process_faults import deliver, events
from tests.test_slack_processes import BotProcess
from tests.test_store_postgres import until_waiting

ADOPT_AFTER_S = 4.0
ADOPTED = "_The bot process that was writing this answer stopped, so another one took it over: it comes late._"
WORDS = "supercalifragilisticexpialidocious " * 5  # 175 characters, few tokens
LONG = [WORDS] * 20 + ["<end_of_utterance>"]  # 3,500 characters: more than one Slack message (3,000)


async def kill(bot: BotProcess) -> None:
    bot.process.send_signal(signal.SIGKILL)
    await bot.process.wait()


def no_stop_button(messages: list[Posted]) -> bool:
    return all(STOP not in message.actions() for message in messages)


async def test_a_follow_up_waits_for_the_stranded_question_before_it_which_is_adopted_in_full(tmp_path, postgres_url):
    async with FakeSlack() as slack, FakeTGI() as tgi:
        doomed = BotProcess(write_config(tmp_path / "doomed.toml", slack, tgi, postgres_url, ADOPT_AFTER_S))
        live = BotProcess(write_config(tmp_path / "live.toml", slack, tgi, postgres_url, ADOPT_AFTER_S))
        try:
            await asyncio.gather(doomed.start(), live.start())
            never = asyncio.Event()
            tgi.replies.extend([Reply(["Half", " an", " answer"], hold_after=2, gate=never), Reply(LONG)])
            question = slack.mention("C1", "U1", "first question", name="Ann")
            await deliver(slack, doomed, question)
            await slack.calls.wait_for(lambda calls: any("Half an" in m.text for m in slack.thread("C1", question["ts"])))
            begun = [message.ts for message in slack.thread("C1", question["ts"])]

            # The follow-up reaches the other process, which waits for the conversation.
            follow_up = await deliver(slack, live, slack.message("C1", "U1", "and a follow-up", thread_ts=question["ts"], name="Ann"))
            await until_waiting(postgres_url, 1)
            await kill(doomed)
            assert await live.outcome(follow_up) == "slack.replied"
        finally:
            await live.stop()
            if doomed.process.returncode is None:
                await kill(doomed)

        store = await PostgresStore.open(postgres_url)
        try:
            turns = await store.load_turns(ConversationKey("slack", "C1", question["ts"]))
        finally:
            await store.close()

    answer = "".join(LONG[:-1]).strip()
    assert [(turn.role, turn.text) for turn in turns] == [
        ("user", "first question"), ("assistant", answer), ("user", "and a follow-up"), ("assistant", "A red square.")
    ]  # fmt: skip
    order = [entry["event"] for entry in live.logs.items if entry["event"] in ("slack.resumed", "slack.replied")]
    assert order == ["slack.resumed", "slack.replied"]
    follow_up_prompt = tgi.generate_requests[2]["inputs"]
    assert follow_up_prompt.index("first question") < follow_up_prompt.index(WORDS.strip()) < follow_up_prompt.index("and a follow-up")
    # The adopted answer goes on in the dead process's placeholder, whole, and no Stop button is left.
    # (The follow-up's placeholder was posted when it arrived, so it stands between the answer's parts.)
    thread = slack.thread("C1", question["ts"])
    adopted = [message for message in thread if message.text != "A red square."]
    assert len(thread) == 3 and thread[0].ts == begun[0] and len(begun) == 1
    assert thread[0].text.startswith(WORDS.strip()) and thread[0].blocks == []
    shown = " ".join(message.text for message in adopted)
    assert " ".join(shown.split()).startswith(" ".join(answer.split())) and shown.endswith(ADOPTED)
    assert no_stop_button(thread)
    assert [entry["event"] for entry in events(live, "slack.resumed")] == ["slack.resumed"]
    assert live.errors() == []


async def test_of_two_processes_that_find_the_same_stranded_question_one_answers_and_the_other_steps_back(tmp_path, postgres_url):
    adopt_after_s = 8.0  # a lease of 4 s: the test acts well within it after the kill
    async with FakeSlack() as slack, FakeTGI() as tgi:
        doomed, one, two = (
            BotProcess(write_config(tmp_path / f"{name}.toml", slack, tgi, postgres_url, adopt_after_s)) for name in ("doomed", "one", "two")
        )
        database = await asyncpg.connect(postgres_url)
        try:
            await asyncio.gather(doomed.start(), one.start(), two.start())
            [doomed_id] = [entry["process_id"] for entry in events(doomed, "store.opened")]
            tgi.replies.append(Reply(["Half", " an", " answer"], hold_after=2, gate=asyncio.Event()))
            question = slack.mention("C1", "U1", "a question", name="Ann")
            await deliver(slack, doomed, question)
            await slack.calls.wait_for(lambda calls: any("Half an" in m.text for m in slack.thread("C1", question["ts"])))
            begun = [message.ts for message in slack.thread("C1", question["ts"])]

            await kill(doomed)
            await until_released(database)
            # Both live processes look for stranded questions and wait for the leases; meanwhile the
            # dead process's lease ends, so that both find its question in the same look.
            async with database.transaction():
                await database.execute("LOCK TABLE processes IN ACCESS EXCLUSIVE MODE")
                await database.execute("DELETE FROM processes WHERE id = $1", doomed_id)
                await until_looking(postgres_url, 2)
            outcomes = await asyncio.gather(*(bot.logs.wait_for(lambda lines: took_up(lines, question["ts"])) for bot in (one, two)))
        finally:
            await database.close()
            await asyncio.gather(one.stop(), two.stop())
            if doomed.process.returncode is None:
                await kill(doomed)

    assert sorted(outcomes) == ["slack.resume_left", "slack.resumed"]
    assert all(entry["found"] == 1 for bot in (one, two) for entry in events(bot, "slack.unanswered")[-1:])
    [answer] = slack.thread("C1", question["ts"])
    assert answer.ts == begun[0] and answer.text == f"A red square.\n\n{ADOPTED}" and no_stop_button([answer])
    assert len(tgi.generate_requests) == 2  # the dead process's, and one adopter's
    assert one.errors() == [] and two.errors() == []


def took_up(lines: list[dict], question: str) -> str | None:
    """How a process ended its attempt at the stranded question: it answered it, or left it to another."""
    return next((e["event"] for e in lines if e["event"] in ("slack.resumed", "slack.resume_left") and e.get("message_ts") == question), None)


async def until_released(database: asyncpg.Connection) -> None:
    """Wait (10 s at most) until no conversation is held: a killed process's connections are gone."""
    async with asyncio.timeout(10):
        while await database.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"):  # noqa: ASYNC110 (PostgreSQL's state can only be polled)
            await asyncio.sleep(0.01)


async def until_looking(url: str, count: int) -> None:
    """Wait (20 s at most) until `count` processes wait on a table lock while looking for stranded questions."""
    connection = await asyncpg.connect(url)
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%NOT EXISTS (SELECT 1 FROM processes p%'"
    try:
        async with asyncio.timeout(20):
            while await connection.fetchval(query) < count:  # noqa: ASYNC110 (PostgreSQL's state can only be polled)
                await asyncio.sleep(0.01)
    finally:
        await connection.close()


async def test_a_placeholder_posted_for_a_question_its_process_never_stored_is_removed(tmp_path, postgres_url):
    async with FakeSlack() as slack, FakeTGI() as tgi:
        doomed = BotProcess(write_config(tmp_path / "doomed.toml", slack, tgi, postgres_url, ADOPT_AFTER_S))
        live = BotProcess(write_config(tmp_path / "live.toml", slack, tgi, postgres_url, ADOPT_AFTER_S))
        database = await asyncpg.connect(postgres_url)
        try:
            await asyncio.gather(doomed.start(), live.start())
            tgi.tokenize_gate = asyncio.Event()  # the question is stored once it is counted: never, here
            question = slack.mention("C1", "U1", "a question", name="Ann")
            await deliver(slack, doomed, question)
            async with asyncio.timeout(30):  # the placeholder is posted, and recorded with the question
                while not await database.fetchval("SELECT count(*) FROM replies WHERE question = $1", question["ts"]):  # noqa: ASYNC110 (PostgreSQL's state can only be polled)
                    await asyncio.sleep(0.01)
            [placeholder] = slack.thread("C1", question["ts"])
            await kill(doomed)
            await live.logs.wait_for(lambda lines: any(e["event"] == "slack.reply_removed" for e in lines))
            turns = await database.fetchval("SELECT count(*) FROM turns")
        finally:
            tgi.tokenize_gate.set()
            await database.close()
            await live.stop()
            if doomed.process.returncode is None:
                await kill(doomed)

    assert turns == 0 and slack.thread("C1", question["ts"]) == [] and [m.ts for m in slack.deleted] == [placeholder.ts]
    assert live.errors() == []
