"""The real `idefics-bot run` as a child process, stopped the hard way and the polite way.

- `kill -9` while replies are being written: after a restart, the store is whole, and the messages
  whose replies the kill interrupted are answered in their threads (the others are not answered twice).
- SIGTERM: no new message is taken (its asker is told the bot is stopping), the reply in flight is
  finished, one that can't finish in time is cancelled with a notice, and the process exits 0 within
  `[bot] shutdown_grace_s`.
- And the SQLite store alone, killed in the middle of a stream of writes.

The bot talks to the fake Slack (HTTP mode) and, for its model, to the fake TGI server, which lets a
test hold a reply in the middle; the child's JSON log lines and the fakes' records say what happened.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from bot.state.store import SQLiteStore
from ground.conversation import ConversationKey
from tests.bots import slack_settings
from tests.conftest import image_bytes
from tests.fake_slack import FakeSlack
from tests.fake_tgi import FakeTGI, Reply
from tests.test_faults import assert_whole, stored_conversations
from tests.test_slack_processes import BotProcess

LATE = "_I was restarted while writing this answer, so it comes late._"
REPLY = "A red square."  # the fake TGI's default reply


def bot_config(tmp_path: Path, slack: FakeSlack, tgi: FakeTGI, grace: float = 10.0) -> Path:
    """A config for `idefics-bot run` in `tmp_path`: Slack HTTP mode on `slack`, the model at `tgi`,
    state in SQLite, JSON logs."""
    section = "\n".join(f"{key} = {json.dumps(value)}" for key, value in slack_settings(slack).items())
    path = tmp_path / "bot.toml"
    path.write_text(
        f'[bot]\nshutdown_grace_s = {grace}\n[model]\nbackend = "tgi"\nurl = "{tgi.url}"\n[generation]\nmax_new_tokens = 40\n'
        f'[images]\nallowed_hosts = ["127.0.0.1"]\n[limits]\nper_user_per_minute = 0\n'
        f'[state]\npath = "{tmp_path / "state" / "bot.sqlite3"}"\n[logging]\njson = true\n[slack]\n{section}\n',
        encoding="utf-8",
    )
    return path


async def deliver(slack: FakeSlack, bot: BotProcess, event: dict) -> str:
    body = slack.envelope(event)
    assert (await slack.deliver(bot.endpoint, body)).status == 200
    return body["event_id"]


def events(bot: BotProcess, name: str) -> list[dict]:
    return [entry for entry in bot.logs.items if entry["event"] == name]


async def test_a_bot_killed_while_replying_answers_after_a_restart_with_its_store_whole(tmp_path):
    async with FakeSlack() as slack, FakeTGI() as tgi:
        config = bot_config(tmp_path, slack, tgi)
        killed = BotProcess(config)
        await killed.start()
        try:
            answered = [slack.mention(f"C{n}", f"U{n}", f"question {n}") for n in (1, 2)]
            for mention in answered:
                assert await killed.outcome(await deliver(slack, killed, mention)) == "slack.replied"
            # Two more are in the middle of their answers (one about an image) when the process dies.
            never = asyncio.Event()
            tgi.replies.extend(Reply(["Half", " an", " answer", " and"], hold_after=3, gate=never) for _ in range(2))
            photo = slack.add_file("red.png", image_bytes((220, 20, 20)))
            interrupted = [slack.mention("C3", "U3", "what is this?", files=[photo]), slack.mention("C4", "U4", "question 4")]
            for mention in interrupted:
                await deliver(slack, killed, mention)
            await tgi.wait_for(lambda: tgi.streaming == 2, timeout=60)
        finally:
            killed.process.send_signal(signal.SIGKILL)
            await killed.process.wait()
        assert killed.process.returncode == -signal.SIGKILL

        restarted = BotProcess(config)
        await restarted.start()
        try:
            await restarted.logs.wait_for(lambda lines: len([e for e in lines if e["event"] == "slack.resumed"]) == 2, timeout=60)
        finally:
            status = await restarted.stop()
        assert status == 0 and restarted.errors() == []

    assert sorted(entry["conversation"] for entry in events(restarted, "slack.resumed")) == [f"slack:{m['channel']}:{m['ts']}" for m in interrupted]
    for mention in interrupted:  # the interrupted answer stays as it was; the whole one follows it
        *_, answer = slack.thread(mention["channel"], mention["ts"])
        assert answer.text == f"{REPLY}\n\n{LATE}"
    for mention in answered:
        assert [m.text for m in slack.thread(mention["channel"], mention["ts"])] == [REPLY]  # not answered twice
    assert len(tgi.generate_requests) == 6
    resumed_with_image = [request for request in tgi.generate_requests[4:] if "what is this?" in request["inputs"]]
    assert len(resumed_with_image) == 1 and "![](data:image/" in resumed_with_image[0]["inputs"]  # the image, read back from the store
    conversations = stored_conversations(tmp_path / "state" / "bot.sqlite3")
    assert_whole(conversations)
    assert len(conversations) == 4


async def test_sigterm_with_a_full_queue_exits_within_a_short_grace(tmp_path):
    """A grace of 4 s with 8 replies streaming that will never finish and 16 waiting: every asker is
    told, and the process ends within the 4 s, whatever is still running."""
    grace = 4.0
    async with FakeSlack() as slack, FakeTGI() as tgi:
        config = bot_config(tmp_path, slack, tgi, grace=grace)
        config.write_text(config.read_text().replace('[model]\n', "[model]\nmax_concurrency = 8\n"))
        bot = BotProcess(config)
        await bot.start()
        never = asyncio.Event()
        tgi.replies.extend(Reply(["Never", " done"], hold_after=1, gate=never) for _ in range(24))
        mentions = [slack.mention(f"C{n}", f"U{n}", "a long one, please") for n in range(24)]
        for mention in mentions:
            await deliver(slack, bot, mention)
        await tgi.wait_for(lambda: tgi.streaming == 8, timeout=60)
        try:
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            bot.process.terminate()
            status = await asyncio.wait_for(bot.process.wait(), grace + 30)
            elapsed = loop.time() - signalled
        finally:
            await bot.stop()
    print(f"SIGTERM with 8 streaming and 16 waiting, grace {grace:g} s: exited after {elapsed:.2f} s")
    assert status == 0 and elapsed <= grace, elapsed
    assert bot.errors() == []
    for mention in mentions:
        *_, last = slack.thread(mention["channel"], mention["ts"])
        assert "The bot is shutting down; your request was not answered." in last.text or "I'm shutting down for a moment" in last.text


async def test_sigterm_finishes_the_reply_in_flight_tells_the_others_and_exits_0_within_the_grace(tmp_path):
    grace = 8.0
    async with FakeSlack() as slack, FakeTGI() as tgi:
        bot = BotProcess(bot_config(tmp_path, slack, tgi, grace=grace))
        await bot.start()
        finishing, never = asyncio.Event(), asyncio.Event()
        tgi.replies.extend(
            [Reply(["Almost", " done", ".", "<end_of_utterance>"], hold_after=2, gate=finishing), Reply(["Never", " done"], hold_after=1, gate=never)]
        )
        in_flight = [slack.mention("C1", "U1", "finish this"), slack.mention("C2", "U2", "and this")]
        for number, mention in enumerate(in_flight, start=1):
            await deliver(slack, bot, mention)
            await tgi.wait_for(lambda number=number: tgi.streaming == number, timeout=60)
        try:
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            bot.process.terminate()
            await bot.logs.wait_for(lambda lines: any(e["event"] == "shutdown.started" for e in lines))
            late = slack.mention("C3", "U3", "hello?")
            await deliver(slack, bot, late)
            await slack.calls.wait_for(
                lambda calls: any(c.params.get("channel") == "C3" and "shutting down for a moment" in c.params.get("text", "") for c in calls)
            )
            finishing.set()
            status = await asyncio.wait_for(bot.process.wait(), grace + 30)
            elapsed = loop.time() - signalled
        finally:
            await bot.stop()
    assert status == 0 and elapsed <= grace, elapsed
    assert bot.errors() == []
    [finished] = slack.thread("C1", in_flight[0]["ts"])
    assert finished.text == "Almost done."
    [cancelled] = slack.thread("C2", in_flight[1]["ts"])
    assert cancelled.text == "_The bot is shutting down; your request was not answered._"
    [told] = slack.thread("C3", late["ts"])
    assert told.text == "_I'm shutting down for a moment; please send that again in a minute._"
    conversations = stored_conversations(tmp_path / "state" / "bot.sqlite3")
    assert_whole(conversations)
    assert [key.channel for key in conversations] == ["C1"]  # the cancelled question was taken back; the late one never stored


WRITER = """
import asyncio, sys
from ground.conversation import Author, ConversationKey, Turn
from bot.state.store import SQLiteStore

async def main(path):
    store = await SQLiteStore.open(path)
    number = 0
    while True:
        key = ConversationKey("test", f"c{number % 7}")
        await store.add_turn(key, Turn("user", (f"question {number}",), Author("u", "U"), str(number)))
        await store.add_turn(key, Turn("assistant", (f"answer {number} " * 200,)))
        print(number, flush=True)  # both turns committed
        number += 1

asyncio.run(main(sys.argv[1]))
"""


async def test_the_store_killed_in_the_middle_of_writes_keeps_every_committed_turn(tmp_path):
    path = tmp_path / "state" / "bot.sqlite3"
    writer = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, str(path), stdout=asyncio.subprocess.PIPE)
    committed = -1
    try:
        while committed < 300:
            committed = int(await asyncio.wait_for(writer.stdout.readline(), 60))
    finally:
        writer.kill()  # SIGKILL, somewhere in the next writes
        await writer.wait()

    assert_whole_or_one_question_open(stored_conversations(path))
    store = await SQLiteStore.open(path)  # opens cleanly after the kill
    try:
        turns = [turn for n in range(7) for turn in await store.load_turns(ConversationKey("test", f"c{n}"), limit=10_000)]
    finally:
        await store.close()
    questions = sorted(int(turn.message_id) for turn in turns if turn.role == "user")
    assert questions[: committed + 1] == list(range(committed + 1))  # everything acknowledged is there
    answers = [turn.text for turn in turns if turn.role == "assistant"]
    assert len(answers) > committed and all(text == f"answer {text.split()[1]} " * 200 for text in answers)  # none torn


def assert_whole_or_one_question_open(conversations: dict[ConversationKey, list[str]]) -> None:
    """Whole conversations, except that the one written last may end with its question (the kill
    came between the two commits): a turn to answer after a restart, not a broken one."""
    open_questions = [key for key, roles in conversations.items() if roles[-1] == "user"]
    assert len(open_questions) <= 1
    assert_whole({key: roles[:-1] if key in open_questions else roles for key, roles in conversations.items()})
