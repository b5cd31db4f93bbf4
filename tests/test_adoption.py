"""A process dies for good in the middle of replies: another one, sharing its PostgreSQL database,
notices within `[bot] adopt_after_s` and answers each stranded question once, in the message the dead
process had posted for it; when the dead process is started again, nothing is answered twice.

Two real `idefics-bot run` processes in Slack's HTTP mode, with the model served by the fake TGI
server, which holds the dead process's replies in the middle until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from tests.bots import slack_settings
from tests.fake_slack import FakeSlack
from tests.fake_tgi import FakeTGI, Reply
from tests.test_process_faults import LATE, REPLY, deliver, events
from tests.test_slack_processes import BotProcess

ADOPT_AFTER_S = 4.0


def config(path: Path, slack: FakeSlack, tgi: FakeTGI, postgres_url: str) -> Path:
    section = "\n".join(f"{key} = {json.dumps(value)}" for key, value in slack_settings(slack).items())
    path.write_text(
        f'[bot]\nadopt_after_s = {ADOPT_AFTER_S}\n[model]\nbackend = "tgi"\nurl = "{tgi.url}"\n[generation]\nmax_new_tokens = 40\n'
        f'[limits]\nper_user_per_minute = 0\n[state]\nurl = "{postgres_url}"\n[logging]\njson = true\n[slack]\n{section}\n',
        encoding="utf-8",
    )
    return path


async def test_a_live_process_answers_a_dead_ones_questions_once_in_its_placeholders(tmp_path, postgres_url):
    async with FakeSlack() as slack, FakeTGI() as tgi:
        dead, live = BotProcess(config(tmp_path / "dead.toml", slack, tgi, postgres_url)), BotProcess(config(tmp_path / "live.toml", slack, tgi, postgres_url))
        returned = BotProcess(dead.config)
        try:
            await asyncio.gather(dead.start(), live.start())
            never = asyncio.Event()
            tgi.replies.extend(Reply(["Half", " an", " answer", " and"], hold_after=2, gate=never) for _ in range(2))
            stranded = [slack.mention(f"C{n}", f"U{n}", f"question {n}") for n in (1, 2)]
            for mention in stranded:
                await deliver(slack, dead, mention)
            # Both replies are under way: each thread shows the dead process's message with part of it.
            await slack.calls.wait_for(lambda calls: all(any("Half an" in m.text for m in slack.thread(s["channel"], s["ts"])) for s in stranded), timeout=60)
            placeholders = {mention["ts"]: [m.ts for m in slack.thread(mention["channel"], mention["ts"])] for mention in stranded}

            loop = asyncio.get_running_loop()
            dead.process.send_signal(signal.SIGKILL)
            await dead.process.wait()
            killed = loop.time()
            await live.logs.wait_for(lambda lines: len([e for e in lines if e["event"] == "slack.resumed"]) == 2, timeout=60)
            delay = loop.time() - killed
            print(f"adoption: both stranded questions answered {delay:.1f} s after the kill (adopt_after_s = {ADOPT_AFTER_S:g})")
            assert delay <= ADOPT_AFTER_S + 2.0, delay  # the answers themselves take a moment

            # The dead process comes back: what was adopted stays answered once.
            await returned.start()
            await returned.logs.wait_for(lambda lines: any(e["event"] == "slack.unanswered" for e in lines), timeout=60)
            assert [e["found"] for e in events(returned, "slack.unanswered")] == [0]
        finally:
            await dead.process.wait() if dead.process else None
            statuses = await asyncio.gather(live.stop(), returned.stop())
        assert statuses == [0, 0] and live.errors() == [] and returned.errors() == []

    for mention in stranded:
        [answer] = slack.thread(mention["channel"], mention["ts"])  # the dead process's message, edited
        assert [answer.ts] == placeholders[mention["ts"]]
        assert answer.text == f"{REPLY}\n\n{LATE}"
    assert len(tgi.generate_requests) == 4  # two cut short by the kill, two answers from the live process
    assert sorted(entry["conversation"] for entry in events(live, "slack.resumed")) == sorted(f"slack:{m['channel']}:{m['ts']}" for m in stranded)
