"""What adoption must get right besides the plain case (tests/test_adoption.py), each with real
`idefics-bot run` processes on one PostgreSQL database, one of them killed (`kill -9`) and never
started again: a follow-up that reached another process while the question before it was being
answered, a long adopted answer, and two processes that find the same stranded question at once.
The test acts as Slack (tests/fake_slack.py); the model is the fake TGI server."""

from __future__ import annotations

import asyncio
import signal

from adapters.slack_blocks import STOP
from bot.core.conversation import ConversationKey
from bot.state.postgres import PostgresStore
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
