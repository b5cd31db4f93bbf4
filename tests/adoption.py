"""The adoption scenario (tests/test_adoption.py, benchmarks/adoption.py): of two real `idefics-bot
run` processes in Slack's HTTP mode on one PostgreSQL database, one is killed in the middle of two
replies and only started again once the other has answered them.

The model is the fake TGI server, which holds the doomed process's replies halfway; the test acts as
Slack (tests/fake_slack.py) and reads what each process did in its JSON log lines.
"""

from __future__ import annotations

import asyncio
import json
import signal
from dataclasses import dataclass
from pathlib import Path

from tests.bots import slack_settings
from tests.fake_slack import FakeSlack
from tests.fake_tgi import FakeTGI, Reply
from tests.test_process_faults import deliver, events
from tests.test_slack_processes import BotProcess


@dataclass
class Adoption:
    """What happened. `delay`: seconds from the kill until the live process had answered both."""

    delay: float
    begun: dict[str, list[str]]  # question ts -> the ts of the messages the killed process posted for it
    answers: dict[str, list[tuple[str, str]]]  # question ts -> (ts, text) of the bot's messages in its thread, at the end
    resumed: list[str]  # the conversations the live process answered late
    model_requests: int
    found_on_return: list[int]  # what the returning process found to answer at start-up
    statuses: list[int | None]  # exit statuses of the live and the returning process (SIGTERM)
    errors: list[dict]  # ERROR log lines of both


def write_config(path: Path, slack: FakeSlack, tgi: FakeTGI, postgres_url: str, adopt_after_s: float) -> Path:
    section = "\n".join(f"{key} = {json.dumps(value)}" for key, value in slack_settings(slack).items())
    path.write_text(
        f'[bot]\nadopt_after_s = {adopt_after_s}\n[model]\nbackend = "tgi"\nurl = "{tgi.url}"\n[generation]\nmax_new_tokens = 40\n'
        f'[limits]\nper_user_per_minute = 0\n[state]\nurl = "{postgres_url}"\n[logging]\njson = true\n[slack]\n{section}\n',
        encoding="utf-8",
    )
    return path


async def run_adoption(directory: Path, postgres_url: str, adopt_after_s: float) -> Adoption:
    async with FakeSlack() as slack, FakeTGI() as tgi:
        doomed = BotProcess(write_config(directory / "doomed.toml", slack, tgi, postgres_url, adopt_after_s))
        live = BotProcess(write_config(directory / "live.toml", slack, tgi, postgres_url, adopt_after_s))
        returned = BotProcess(doomed.config)
        try:
            await asyncio.gather(doomed.start(), live.start())
            never = asyncio.Event()
            tgi.replies.extend(Reply(["Half", " an", " answer", " and"], hold_after=2, gate=never) for _ in range(2))
            questions = [slack.mention(f"C{n}", f"U{n}", f"question {n}") for n in (1, 2)]
            for question in questions:
                await deliver(slack, doomed, question)

            def shown(question: dict) -> bool:
                return any("Half an" in message.text for message in slack.thread(question["channel"], question["ts"]))

            await slack.calls.wait_for(lambda calls: all(shown(question) for question in questions))
            begun = {question["ts"]: [message.ts for message in slack.thread(question["channel"], question["ts"])] for question in questions}

            loop = asyncio.get_running_loop()
            doomed.process.send_signal(signal.SIGKILL)
            await doomed.process.wait()
            killed = loop.time()
            await live.logs.wait_for(lambda lines: len([e for e in lines if e["event"] == "slack.resumed"]) == len(questions), timeout=adopt_after_s + 60)
            delay = loop.time() - killed

            await returned.start()
            await returned.logs.wait_for(lambda lines: any(e["event"] == "slack.unanswered" for e in lines))
        finally:
            statuses = list(await asyncio.gather(live.stop(), returned.stop()))
            if doomed.process is not None and doomed.process.returncode is None:
                doomed.process.kill()
                await doomed.process.wait()
    return Adoption(
        delay=delay,
        begun=begun,
        answers={q["ts"]: [(m.ts, m.text) for m in slack.thread(q["channel"], q["ts"])] for q in questions},
        resumed=sorted(entry["conversation"] for entry in events(live, "slack.resumed")),
        model_requests=len(tgi.generate_requests),
        found_on_return=[entry["found"] for entry in events(returned, "slack.unanswered")],
        statuses=statuses,
        errors=live.errors() + returned.errors(),
    )
