"""Two real `idefics-bot run` processes in Slack's HTTP mode on one PostgreSQL database, as behind a
load balancer in production, with the model served by a (fake) TGI server that both use.

The test acts as Slack (tests/fake_slack.py) and POSTs events to the processes directly. It sees what
each process does in its JSON log lines, what the model was asked in the requests the fake TGI server
records, and what was posted in the fake Slack.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from adapters.slack.actions import NOT_ALLOWED
from adapters.slack.blocks import STOP
from bot.runtime.config import load_config
from tests.bots import slack_settings
from tests.fake_slack import BOT_USER, FakeSlack, Journal
from tests.fake_tgi import FakeTGI, Reply
from tests.test_cli import COMMAND
from tests.test_store_postgres import until_waiting

CHANNEL, ANN, BOB = "C0000001", "U0000001", "U0000002"
_EXITED = "process.exited"  # the journal's last entry, once the process's stderr closes


class BotProcess:
    """`idefics-bot run --config <path>` as a child process; its JSON log lines as a Journal."""

    def __init__(self, config: Path):
        self.config = config
        slack = load_config(config, environ={}).slack
        self.endpoint = f"http://{slack.http_host}:{slack.http_port}{slack.events_path}"
        self.logs = Journal()
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        # Only the config file configures the bot: no secrets or database from the environment.
        environment = {key: value for key, value in os.environ.items() if not key.startswith(("SLACK_", "DISCORD_", "DATABASE_"))}
        self.process = await asyncio.create_subprocess_exec(
            *COMMAND, "run", "--config", str(self.config),
            cwd=self.config.parent, env=environment | {"HF_HUB_OFFLINE": "1"},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        started = await self.logs.wait_for(lambda lines: self._first(lines, ("slack.started", _EXITED)), 120)
        assert started == "slack.started", self.logs.items

    async def _read(self) -> None:
        async for line in self.process.stderr:
            try:
                self.logs.add(json.loads(line))
            except ValueError:  # not a log line of ours (a crash's traceback, say)
                self.logs.add({"event": "text", "level": "ERROR", "text": line.decode(errors="replace")})
        self.logs.add({"event": _EXITED, "level": "INFO"})

    async def outcome(self, event_id: str) -> str:
        """Whether this process answered the event ("slack.replied") or saw it was not its to answer ("slack.duplicate")."""
        return await self.logs.wait_for(lambda lines: self._first(lines, ("slack.replied", "slack.duplicate"), event_id=event_id))

    @staticmethod
    def _first(lines: list[dict], events: tuple[str, ...], **fields: str) -> str | None:
        """The first of `events` among the log lines (with those `fields`), or None."""
        return next((e["event"] for e in lines if e["event"] in events and all(e.get(k) == v for k, v in fields.items())), None)

    async def stop(self) -> int | None:
        """SIGTERM, as a service manager stops it; returns the exit status."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.terminate()
        status = await asyncio.wait_for(self.process.wait(), 60)
        await self._reader
        return status

    def errors(self) -> list[dict]:
        return [entry for entry in self.logs.items if entry.get("level") in ("ERROR", "CRITICAL")]


def write_config(path: Path, slack: FakeSlack, tgi: FakeTGI, postgres_url: str) -> Path:
    settings = slack_settings(slack)
    slack_section = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    path.write_text(
        f'[model]\nbackend = "tgi"\nurl = "{tgi.url}"\n[generation]\nmax_new_tokens = 40\n[limits]\nper_user_per_minute = 0\n'
        f'[state]\nurl = "{postgres_url}"\n[logging]\njson = true\n[slack]\n{slack_section}\n',
        encoding="utf-8",
    )
    return path


async def test_two_processes_on_one_database_answer_each_event_once_and_a_thread_in_order(tmp_path, postgres_url):
    async with FakeSlack() as slack, FakeTGI() as tgi:
        first, second = (BotProcess(write_config(tmp_path / f"bot{n}.toml", slack, tgi, postgres_url)) for n in (1, 2))
        try:
            await asyncio.gather(first.start(), second.start())

            # The same event reaches both processes at once (a retry that overtook a slow first delivery).
            mention = slack.mention(CHANNEL, ANN, "What is this?", name="Ann")
            body = slack.envelope(mention)
            deliveries = await asyncio.gather(*(slack.deliver(bot.endpoint, body) for bot in (first, second)))
            assert [delivery.status for delivery in deliveries] == [200, 200]
            outcomes = await asyncio.gather(*(bot.outcome(body["event_id"]) for bot in (first, second)))
            assert sorted(outcomes) == ["slack.duplicate", "slack.replied"]
            assert len(slack.thread(CHANNEL, mention["ts"])) == 1 and len(tgi.generate_requests) == 1

            # Two messages of the thread, one to each process: the second waits for the first's answer.
            tgi.replies.append(Reply(["First", " answer", "<end_of_utterance>"], hold_after=1))
            tgi.replies.append(Reply(["Second", " answer", "<end_of_utterance>"]))
            one = slack.envelope(slack.message(CHANNEL, ANN, "Tell me more", thread_ts=mention["ts"], name="Ann"))
            two = slack.envelope(slack.message(CHANNEL, BOB, "And then?", thread_ts=mention["ts"], name="Bob"))
            assert (await slack.deliver(first.endpoint, one)).status == 200
            await tgi.wait_for(lambda: len(tgi.generate_requests) == 2, timeout=60)  # the first is being answered
            assert (await slack.deliver(second.endpoint, two)).status == 200
            await until_waiting(postgres_url, 1)  # the second process waits for the conversation
            assert len(tgi.generate_requests) == 2
            tgi.release.set()
            assert await first.outcome(one["event_id"]) == "slack.replied"
            assert await second.outcome(two["event_id"]) == "slack.replied"
        finally:
            statuses = await asyncio.gather(first.stop(), second.stop())
        assert statuses == [0, 0] and first.errors() == [] and second.errors() == []

    asked = tgi.generate_requests[2]["inputs"]
    assert asked.index("[Ann] Tell me more") < asked.index("Assistant: First answer") < asked.index("[Bob] And then?")
    assert f"<@{BOT_USER}>" not in asked
    replies = [message.text for message in slack.thread(CHANNEL, mention["ts"])]
    assert len(replies) == 3 and replies[1:] == ["First answer", "Second answer"]


async def test_a_stop_click_that_reaches_the_other_process_stops_the_reply_where_it_is_written(tmp_path, postgres_url):
    async with FakeSlack() as slack, FakeTGI() as tgi:
        writer, other = (BotProcess(write_config(tmp_path / f"bot{n}.toml", slack, tgi, postgres_url)) for n in (1, 2))
        try:
            await asyncio.gather(writer.start(), other.start())
            tgi.replies.append(Reply(["A", " long", " answer", " that", " goes", " on"], hold_after=2, gate=asyncio.Event()))
            mention = slack.mention(CHANNEL, ANN, "Tell me everything", name="Ann")
            body = slack.envelope(mention)
            assert (await slack.deliver(writer.endpoint, body)).status == 200
            await slack.calls.wait_for(lambda calls: any(m.text == "A long" for m in slack.thread(CHANNEL, mention["ts"])))
            [placeholder] = slack.thread(CHANNEL, mention["ts"])

            # Slack hands the clicks to the other process (a load balancer would, half of the time).
            bobs = slack.click(placeholder, STOP, BOB)
            assert (await slack.interact(other.endpoint, bobs)).status == 200
            assert (await responded(slack, bobs))["text"] == NOT_ALLOWED
            assert (await slack.interact(other.endpoint, slack.click(placeholder, STOP, ANN))).status == 200
            assert await writer.outcome(body["event_id"]) == "slack.replied"
        finally:
            statuses = await asyncio.gather(writer.stop(), other.stop())
        assert statuses == [0, 0] and writer.errors() == [] and other.errors() == []

    assert placeholder.text.startswith("A long") and placeholder.text.endswith(f"_Stopped by {ANN.lower()}._")
    assert STOP not in placeholder.actions() and len(slack.thread(CHANNEL, mention["ts"])) == 1
    assert [entry["outcome"] for entry in other.logs.items if entry["event"] == "slack.stop"] == ["not_allowed", "stopped"]
    assert len(slack.responses.items) == 1  # Ann's click needs no word: the reply shows it stopped


async def responded(slack: FakeSlack, click: dict) -> dict:
    """What the bot posted to the click's response_url."""
    response_id = click["response_url"].rsplit("/", 1)[1]
    return await slack.responses.wait_for(lambda items: next((body for rid, body in items if rid == response_id), None))
