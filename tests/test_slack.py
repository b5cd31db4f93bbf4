"""The Slack adapter end to end: the real slack-bolt app, started through `idefics-bot run`'s start-up
path (`run_bot`) on the tiny checkpoint, against the fake Slack of tests/fake_slack.py on 127.0.0.1.

The model is the real local backend; a `ModelTap` (tests/model_tap.py) sees every prompt the model
gets, can make a reply say a given text, and can hold generation on the model's worker thread until
the test lets it go. Tests wait on what the fake Slack records and on the adapter's log events, never
on sleeps.

The tests marked `ALSO_TWO_PROCESSES` run twice: with one bot, and with two (each its own `run_bot`,
Runtime, model and HTTP listener) on one PostgreSQL database behind a load balancer
(tests/load_balancer.py), which hands Slack's requests to them in turn and retries to the other one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from contextlib import AsyncExitStack

import pytest

from bot.runtime.cli import CommandError
from bot.runtime.config import Config
from bot.settings import ConfigError
from tests.bots import BotRun, Harness, logged, running, slack_settings, slack_started
from tests.conftest import BOTH_FAMILIES, image_bytes, write_config
from tests.fake_slack import ALL_SCOPES, APP_TOKEN, BOT_ID, Failure, FakeSlack
from tests.load_balancer import LoadBalancer

CHANNEL, OTHER_CHANNEL, DM = "C0000001", "C0000002", "D0000001"
ANN, BOB = "U0000001", "U0000002"
PLACEHOLDER = "_Thinking…_"


def slack_config(
    tmp_path, checkpoint, slack: FakeSlack, *, max_new_tokens: int = 64, state_url: str | None = None, extra: str = "", **settings
) -> Config:
    """[slack] `settings` on the fake; the state in a SQLite file, or in the PostgreSQL database `state_url`;
    `extra`: more sections of the config file."""
    section = "\n".join(f"{key} = {json.dumps(value)}" for key, value in slack_settings(slack, **settings).items())
    state = f'url = "{state_url}"' if state_url else f'path = "{tmp_path / "state" / "bot.sqlite3"}"'
    return write_config(
        tmp_path / "slack.toml",
        f"""
[bot]
shutdown_grace_s = 10.0
[model]
checkpoint = "{checkpoint}"
[generation]
max_new_tokens = {max_new_tokens}
[images]
allowed_hosts = ["127.0.0.1"]
[limits]
per_user_per_minute = 0
[state]
{state}
[slack]
{section}
{extra}
""",
    )


@pytest.fixture
async def slack():
    async with FakeSlack() as fake:
        yield fake
    assert not fake.unexpected


@pytest.fixture
async def logs():
    with logged("adapters") as journal:
        yield journal


@pytest.fixture
def processes(request) -> int:
    """How many bot processes serve the fake Slack: 1, unless a test is marked ALSO_TWO_PROCESSES."""
    return getattr(request, "param", 1)


ALSO_TWO_PROCESSES = pytest.mark.parametrize("processes", [1, 2], indirect=True, ids=["one process", "two processes"])


@pytest.fixture
async def start_bots(request, tmp_path, tiny_checkpoint, slack, logs, tap, processes):
    """Starts the bot with [slack] settings (keywords) and returns its Harness: `processes` bots, on
    one PostgreSQL database behind a load balancer when there are several. All stop at the end."""
    state_url = request.getfixturevalue("postgres_url") if processes > 1 else None
    async with AsyncExitStack() as stack:

        async def start(**settings) -> Harness:
            configs = [slack_config(tmp_path, tiny_checkpoint, slack, state_url=state_url, **settings) for _ in range(processes)]
            for config in configs:
                await stack.enter_async_context(running(config, logs, tap))
            if processes == 1:
                return Harness(slack, configs[0], logs, tap)
            bots = [f"http://{config.slack.http_host}:{config.slack.http_port}" for config in configs]
            return Harness(slack, configs[0], logs, tap, await stack.enter_async_context(LoadBalancer(bots)))

        yield start


@pytest.fixture
async def harness(start_bots) -> Harness:
    return await start_bots()


def red_and_blue(slack: FakeSlack) -> tuple[dict, dict]:
    return slack.add_file("red.png", image_bytes((220, 20, 20))), slack.add_file("blue.jpg", image_bytes((20, 20, 220), kind="JPEG"), "image/jpeg")


# -- conversations ---------------------------------------------------------------------------


async def test_a_mention_is_answered_in_its_thread_as_the_text_streams_in(harness, slack, tap):
    red, _ = red_and_blue(slack)
    tap.say, tap.finish = "A red square on", False
    tap.gate.clear()
    mention = slack.mention(CHANNEL, ANN, "What is in this image?", files=[red], name="Ann")
    event_id = await harness.send(mention)

    placeholder = await slack.calls.wait_for(lambda calls: [c for c in calls if c.method == "chat.postMessage"])
    assert placeholder[0].params["thread_ts"] == mention["ts"] and placeholder[0].params["text"] == PLACEHOLDER
    await tap.wait_held()
    # While the model is held, the streamed text so far replaces the placeholder (edits at most 1/s).
    await slack.calls.wait_for(lambda calls: any(c.method == "chat.update" and "A red square on" in c.params["text"] for c in calls))
    tap.gate.set()
    await harness.outcome(event_id)

    (reply,) = slack.thread(CHANNEL, mention["ts"])
    # (a busy machine may show the queue position in between)
    assert reply.texts[0] == PLACEHOLDER and any("A red square on" in text for text in reply.texts[1:-1])
    assert reply.text.startswith("A red square on") and len(reply.text) > len("A red square on")
    (prompt,) = tap.prompts
    assert prompt.count("<image>") == 1 and "User: [Ann] What is in this image?" in prompt
    assert "<@" not in prompt  # the bot's own mention is not part of the question


@ALSO_TWO_PROCESSES
@BOTH_FAMILIES
async def test_a_thread_continues_without_mentions_and_the_model_sees_both_images(harness, slack, tap):
    red, blue = red_and_blue(slack)
    mention = slack.mention(CHANNEL, ANN, "What is in this image?", files=[red], name="Ann")
    # Slack sends a mention twice: as app_mention and as a message event (ids differ, ts is the same).
    twin = {**mention, "type": "message", "channel_type": "channel", "text": mention["text"]}
    await harness.answer(mention)
    await harness.outcome(await harness.send(twin), "slack.duplicate")

    follow_up = slack.message(CHANNEL, BOB, "And this one?", files=[blue], thread_ts=mention["ts"], name="Bob")
    thread = await harness.answer(follow_up)
    assert len(thread) == 2 and all(message.thread_ts == mention["ts"] for message in thread)
    last = tap.prompts[-1]
    assert tap.images(last) == 2
    assert last.index("[Ann] What is in this image?") < last.index("[Bob] And this one?")

    # Not addressed to the bot: a top-level message, and a thread the bot is not in.
    for event in (slack.message(CHANNEL, ANN, "lunch?"), slack.message(CHANNEL, ANN, "me too", thread_ts="1690000000.000001")):
        record = await harness.outcome(await harness.send(event), "slack.ignored")
        assert record.reason == "not addressed to the bot"
    assert len(tap.prompts) == 2 and len(slack.api("chat.postMessage")) == 2


@ALSO_TWO_PROCESSES
async def test_in_a_dm_every_message_is_a_turn(harness, slack, tap):
    _, blue = red_and_blue(slack)
    first = await harness.answer(slack.message(DM, ANN, "Hello there", channel_type="im", name="Ann"))
    assert len(first) == 1 and first[0].thread_ts is None  # answered in the DM itself
    second = await harness.answer(slack.message(DM, ANN, "", files=[blue], channel_type="im", name="Ann"))  # an image alone
    assert len(second) == 2
    last = tap.prompts[-1]
    assert "User: Hello there" in last and last.count("<image>") == 1
    assert "[Ann]" not in last  # one person: no speaker names


@ALSO_TWO_PROCESSES
async def test_each_message_gets_one_answer_however_often_slack_delivers_it(harness, slack, tap):
    tap.gate.clear()
    mention = slack.mention(CHANNEL, ANN, "Count the dots")
    event_id = await harness.send(mention)
    await tap.wait_held()
    await harness.send(mention, event_id=event_id, retry=1)  # Slack timed out waiting for us, in its view
    record = await harness.outcome(event_id, "slack.duplicate")
    assert record.retry == "1"
    tap.gate.set()
    await harness.outcome(event_id)
    await harness.send(mention, event_id=event_id, retry=2)
    await harness.logs.wait_for(lambda records: sum(r.msg == "slack.duplicate" for r in records) == 2)

    assert len(tap.prompts) == 1
    assert len(slack.thread(CHANNEL, mention["ts"])) == 1 and len(slack.api("chat.postMessage")) == 1


async def test_events_are_acknowledged_at_once_while_the_model_is_busy(harness, slack, tap):
    tap.gate.clear()
    first = slack.mention(CHANNEL, ANN, "Describe this slowly")
    first_id = await harness.send(first)
    await tap.wait_held()  # the model's worker is now inside generate

    second = slack.envelope(slack.mention(OTHER_CHANNEL, BOB, "Me next"))
    delivery = await slack.deliver(harness.endpoint, second)
    assert delivery.status == 200 and delivery.seconds < 3.0
    command, _ = await slack.command(harness.endpoint, "caption")
    assert command.status == 200 and command.seconds < 3.0 and command.body == "⏳ Working on it…"
    assert not tap.gate.is_set()  # still generating the first reply all along
    # The second request waits for the next batch; its placeholder soon shows its place in line.
    await slack.calls.wait_for(
        lambda calls: any(c.method == "chat.update" and c.params["channel"] == OTHER_CHANNEL and "#1 in line" in c.params["text"] for c in calls)
    )

    tap.gate.set()
    await harness.outcome(first_id)
    await harness.outcome(second["event_id"])


def nested_tokens(depth: int) -> str:
    """A special token hidden in itself: each removal assembles the next one."""
    text = "<image>"
    for _ in range(depth):
        text = f"<ima{text}ge>"
    return text


async def test_hostile_text_never_holds_up_the_acks_of_other_requests(harness, slack, tap):
    """Text that made the old link pattern and token cleaning take seconds on the event loop: 40,000
    characters (refused at once) and just under the limit (read, then found too long by the
    tokenizer). Meanwhile, other requests are acknowledged as fast as ever."""
    await harness.answer(slack.mention(CHANNEL, ANN, "warming up"))
    hostile = {
        "C1": "http://." * 5000,
        "C2": nested_tokens(5700),
        "C3": "http://." * 995,
        "C4": "x" + nested_tokens(1140)[:7900],
    }
    mentions = {channel: slack.mention(channel, ANN, text) for channel, text in hostile.items()}
    acks: list[float] = []

    async def deliver(event: dict) -> str:
        body = slack.envelope(event)
        delivery = await slack.deliver(harness.endpoint, body)
        assert delivery.status == 200
        acks.append(delivery.seconds)
        return body["event_id"]

    async def chatter() -> None:  # messages not for the bot: acknowledged, then ignored
        while True:
            await deliver(slack.message(OTHER_CHANNEL, BOB, f"chatter {len(acks)}"))

    talking = asyncio.create_task(chatter())
    waiting = [await deliver(event) for event in mentions.values()]
    for event_id in waiting:
        await harness.outcome(event_id, timeout=120)
    talking.cancel()
    print(f"{len(acks)} acks while hostile text was processed: max {max(acks) * 1000:.0f} ms, mean {sum(acks) / len(acks) * 1000:.1f} ms")
    assert max(acks) < 1.0, acks
    answers = {channel: slack.thread(channel, event["ts"])[-1].text for channel, event in mentions.items()}
    for channel in ("C1", "C2"):  # refused before anything reads them
        assert re.search(r"Your message is too long for me: it has \d\d,\d{3} characters and I can read about 8,000\.", answers[channel])
    for channel in ("C3", "C4"):  # cleaned, scanned for links and counted by the tokenizer
        assert "Your message is too long for me: it takes about" in answers[channel]


async def test_malformed_requests_get_401_or_400_and_no_traceback(harness, slack, tap):
    """What a stranger or a broken proxy might send: a bad signature gets 401 whatever the body, a
    signed but malformed body 400; never a 500, and the bot goes on answering."""
    with logged("slack_bolt") as bolt, logged("aiohttp") as server:
        unsigned = [
            (b"\xff\xfe not UTF-8", "application/json", None),
            (b'{"type": "event_callback"}', "application/json", "yesterday"),
            (b'{"type": "event_callback"}', "application/json", "9" * 400),
            (b'{"type": "event_callback"}', "application/json", "-5"),
        ]
        for raw, content_type, timestamp in unsigned:
            delivery = await slack.deliver_raw(harness.endpoint, raw, content_type, signed=timestamp is not None, timestamp=timestamp)
            assert delivery.status == 401, (raw, timestamp, delivery)
        signed = [
            (b'{"type": "event_callback", "event": ', "application/json"),
            (b'["a", "JSON", "array"]', "application/json"),
            (b"\xff\xfe not UTF-8", "application/json"),
            (b"[" * 100_000, "application/json"),
            (b"payload=%7Bnot+json", "application/x-www-form-urlencoded"),
            (b"payload=%5B1%2C2%5D", "application/x-www-form-urlencoded"),
            (b"<xml/>", "text/xml"),
        ]
        for raw, content_type in signed:
            delivery = await slack.deliver_raw(harness.endpoint, raw, content_type)
            assert delivery.status == 400, (raw, delivery)
    logged_errors = [r for r in [*bolt.items, *server.items] if r.levelno >= logging.ERROR or r.exc_info]
    assert logged_errors == []
    refusals = [r for r in harness.logs.items if r.msg == "slack.request_refused"]
    assert len(refusals) == len(unsigned) + len(signed) and not any(r.exc_info for r in refusals)
    (reply,) = await harness.answer(slack.mention(CHANNEL, ANN, "still there?"))
    assert reply.text


@ALSO_TWO_PROCESSES
async def test_bad_or_stale_signatures_are_refused_before_anything_runs(harness, slack, tap):
    challenge = await slack.deliver(
        harness.endpoint, {"token": "unused", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}
    )
    assert challenge.status == 200 and "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in challenge.body

    forged = slack.envelope(slack.mention(CHANNEL, BOB, "forged"))
    assert (await slack.deliver(harness.endpoint, forged, secret="not-the-secret")).status == 401
    stale = slack.envelope(slack.mention(CHANNEL, BOB, "replayed"))
    assert (await slack.deliver(harness.endpoint, stale, age=10 * 60)).status == 401

    genuine = slack.mention(CHANNEL, ANN, "genuine")
    await harness.answer(genuine)
    assert len(tap.prompts) == 1 and "genuine" in tap.prompts[0]
    assert [call.params["thread_ts"] for call in slack.api("chat.postMessage")] == [genuine["ts"]]


async def test_model_output_is_posted_escaped(harness, slack, tap):
    tap.say = "<!channel> look at <@U0000123> & <https://x.org|this>"
    thread = await harness.answer(slack.mention(CHANNEL, ANN, "Say something"))
    posted = thread[0].text
    assert "&lt;!channel&gt; look at &lt;@U0000123&gt; &amp; &lt;https://x.org|this&gt;" in posted
    assert "<!channel>" not in posted and "<@" not in posted


async def test_a_rate_limited_update_waits_for_retry_after(harness, slack, tap):
    slack.rate_limited_updates, slack.retry_after = 1, 1
    tap.say = "Patience is a virtue"
    mention = slack.mention(CHANNEL, ANN, "Quick one")
    (reply,) = await harness.answer(mention)
    limited, accepted = slack.api("chat.update")[:2]
    assert accepted.at - limited.at >= 1.0  # not before Retry-After
    assert reply.text.startswith("Patience is a virtue")


# -- files -----------------------------------------------------------------------------------


async def test_a_login_page_instead_of_the_image_is_explained(tmp_path, tiny_checkpoint, logs, tap):
    async with FakeSlack(scopes=tuple(s for s in ALL_SCOPES if s != "files:read")) as slack:
        config = slack_config(tmp_path, tiny_checkpoint, slack)
        async with running(config, logs, tap):
            harness = Harness(slack, config, logs, tap)
            photo = slack.add_file("photo.png", image_bytes())
            (reply,) = await harness.answer(slack.mention(CHANNEL, ANN, "What is this?", files=[photo]))
        assert not slack.unexpected
    assert "Slack sent its login page instead of the file because the app lacks the files:read scope" in reply.text
    assert "photo.png" in reply.text and "<html" not in reply.text.lower()
    assert tap.prompts == []  # the page never reached the model
    assert any(r.msg == "slack.missing_scopes" and r.missing == "files:read" for r in logs.items)


# -- the slash command -----------------------------------------------------------------------


@ALSO_TWO_PROCESSES
async def test_a_file_larger_than_it_claims_is_read_only_up_to_the_limit(start_bots, slack, tap):
    harness = await start_bots()
    liar = slack.add_file("small.png", image_bytes()[:1024], served_bytes=150 * 1024 * 1024)
    (reply,) = await harness.answer(slack.mention(CHANNEL, ANN, "what is this?", files=[liar]))
    assert "I won't fetch small.png: it is larger than the 20.0 MB limit." in reply.text
    assert slack.file_sent["small.png"] < 20 * 1024 * 1024 + 16 * 1024 * 1024  # the limit, and loopback's socket buffers
    assert tap.prompts == []


async def test_forget_deletes_a_persons_messages_everywhere(harness, slack, tap):
    red, _ = red_and_blue(slack)
    await harness.answer(slack.mention(CHANNEL, ANN, "what is this?", files=[red], name="Ann"))
    bobs = slack.mention(OTHER_CHANNEL, BOB, "remember the word banana", name="Bob")
    await harness.answer(bobs)
    forgotten = await harness.command("forget")
    assert forgotten["text"] == "Done: I forgot you everywhere: 2 messages (yours and my answers to them) and 1 image only you sent."
    await harness.answer(slack.message(OTHER_CHANNEL, BOB, "which word?", thread_ts=bobs["ts"], name="Bob"))
    assert "remember the word banana" in tap.prompts[-1]  # Bob's conversation is untouched
    nothing = await harness.command("forget")
    assert nothing["text"] == "There was nothing to forget: I have no messages from you."


async def test_a_usage_error_quotes_what_was_typed_escaped(harness, slack, tap):
    """Slack sends typed <, > and & escaped; quoting them back unescaped would ping the channel."""
    for typed, shown in [("&lt;!channel&gt;", "&lt;!channel&gt;"), ("&lt;!here&gt; now", "&lt;!here&gt;"), ("&lt;@U0000002&gt;", "&lt;@u0000002&gt;")]:
        delivery, _ = await slack.command(harness.endpoint, typed)
        assert delivery.status == 200 and delivery.body.startswith(f"I don't know “{shown}”."), delivery.body
        assert "<!" not in delivery.body and "<@" not in delivery.body
    assert tap.prompts == []


async def test_slash_command_subcommands_answer_through_response_url(start_bots, slack, tap):
    harness = await start_bots(command="/look")
    red = slack.add_image("red.png", image_bytes((220, 20, 20)))

    async def run(text: str, channel: str = CHANNEL) -> dict:
        delivery, response_id = await slack.command(harness.endpoint, text, channel=channel, command="/look")
        assert delivery.status == 200 and delivery.body == "⏳ Working on it…"
        return await slack.responses.wait_for(lambda items: next((body for rid, body in items if rid == response_id), None))

    helped, _ = await slack.command(harness.endpoint, "help", command="/look")
    assert "/look ask &lt;image url&gt; &lt;question&gt;" in helped.body  # shown as typed, not read as a link
    unknown, _ = await slack.command(harness.endpoint, "dance wildly", command="/look")
    assert unknown.body.startswith("I don't know “dance”.")

    caption = await run(f"caption <{red}>")  # Slack may send links in angle brackets
    assert caption["response_type"] == "in_channel" and caption["text"].startswith(f"Caption for <@{ANN}>:\n")
    assert "<image>" in tap.prompts[-1] and "Instruction" not in tap.prompts[-1]
    asked = await run("ask What colour is it?")  # no link: the last image seen in this channel
    assert asked["text"].startswith(f"<@{ANN}> asked: What colour is it?")
    assert "_I used the last image I saw in this channel (red.png)._" in asked["text"]
    assert "User: What colour is it?" in tap.prompts[-1] and "<image>" in tap.prompts[-1]  # the instruct format, as on Discord
    classified = await run(f"classify {red} cat, dog, bird")
    assert "asked which of these fits: cat, dog, bird" in classified["text"]
    assert "['cat', 'dog', 'bird']" in tap.prompts[-1]
    story = await run(f"story {red}")
    assert story["text"].startswith(f"Story for <@{ANN}>:") and "Story:" in tap.prompts[-1]
    too_few = await run(f"classify {red} cat")
    assert "response_type" not in too_few and "at least two labels" in too_few["text"]  # only the asker sees it
    nothing = await run("caption", channel=OTHER_CHANNEL)
    assert "I haven't seen one in this channel yet" in nothing["text"]

    await harness.answer(slack.message(DM, ANN, "Hi", channel_type="im"))
    assert (await run("reset", channel=DM))["text"] == "Forgot 1 conversation here (2 messages); the next message starts afresh."
    assert (await run("reset"))["text"] == "There was nothing to forget here."
    for text in ("first thread", "second thread"):
        await harness.answer(slack.mention(CHANNEL, ANN, text))
    assert (await run("reset"))["text"] == "Forgot 2 conversations here (4 messages); the next message starts afresh."


# -- long replies, restarts, access, Socket Mode ---------------------------------------------


async def test_a_long_reply_continues_in_further_thread_messages(tmp_path, tiny_checkpoint, slack, logs, tap):
    config = slack_config(tmp_path, tiny_checkpoint, slack, max_new_tokens=700)
    words = "these assistant " * 640  # one token each pair: about 10,000 characters
    tap.say = words
    async with running(config, logs, tap):
        mention = slack.mention(CHANNEL, ANN, "Tell me everything")
        thread = await Harness(slack, config, logs, tap).answer(mention, timeout=300)
    # 3,000 characters a message: the text of the last one also goes into a section block, with its buttons.
    assert len(thread) == 4 and all(len(message.text) <= 3000 for message in thread)
    assert all(message.thread_ts == mention["ts"] for message in thread)
    assert [bool(message.actions()) for message in thread] == [False, False, False, True]
    assert " ".join(message.text for message in thread).split() == words.split()


async def test_a_restart_keeps_the_thread_and_the_memory_of_delivered_events(tmp_path, tiny_checkpoint, slack, logs, tap):
    config = slack_config(tmp_path, tiny_checkpoint, slack)
    mention = slack.mention(CHANNEL, ANN, "Remember the red one", files=[red_and_blue(slack)[0]], name="Ann")
    async with running(config, logs, tap):
        harness = Harness(slack, config, logs, tap)
        event_id = await harness.send(mention)
        await harness.outcome(event_id)
    async with running(config, logs, tap):
        await harness.send(mention, event_id=event_id, retry=3)  # Slack's last retry, after the restart
        await harness.outcome(event_id, "slack.duplicate")
        thread = await harness.answer(slack.message(CHANNEL, ANN, "Still there?", thread_ts=mention["ts"], name="Ann"))
    assert len(thread) == 2 and len(tap.prompts) == 2
    assert "[Ann] Remember the red one" in tap.prompts[-1] and tap.prompts[-1].count("<image>") == 1


async def test_access_rules_decide_who_is_answered(tmp_path, tiny_checkpoint, slack, logs, tap):
    config = slack_config(tmp_path, tiny_checkpoint, slack, allowed_channels=[CHANNEL], blocked_users=[BOB], allow_dms=False)
    async with running(config, logs, tap):
        harness = Harness(slack, config, logs, tap)
        bot_post = slack.mention(CHANNEL, "U0000099", "beep") | {"bot_id": "B0000099"}
        own_post = slack.message(CHANNEL, "U0000098", "my own", thread_ts="1690000000.000001") | {"bot_id": BOT_ID}
        for event, reason in [
            (slack.mention(CHANNEL, BOB, "hello"), "user"),
            (slack.mention(OTHER_CHANNEL, ANN, "hello"), "channel not allowed"),
            (slack.message(DM, ANN, "hello", channel_type="im"), "dms disabled"),
            (bot_post, "bot"),
        ]:
            record = await harness.outcome(await harness.send(event), "slack.ignored")
            assert record.reason == reason
        await harness.send(own_post)  # Bolt drops the bot's own messages before any listener
        refused, _ = await slack.command(harness.endpoint, "caption", user=BOB)
        assert refused.body == "Sorry, I'm not available to you here."
        allowed = slack.mention(CHANNEL, ANN, "hello")
        await harness.answer(allowed)
    assert len(tap.prompts) == 1
    assert [call.params["thread_ts"] for call in slack.api("chat.postMessage")] == [allowed["ts"]]


async def test_socket_mode_acknowledges_envelopes_and_answers(tmp_path, tiny_checkpoint, slack, logs, tap):
    config = slack_config(tmp_path, tiny_checkpoint, slack, mode="socket", app_token=APP_TOKEN)
    async with running(config, logs, tap):
        harness = Harness(slack, config, logs, tap)
        mention = slack.mention(CHANNEL, ANN, "Over the socket")
        body = slack.envelope(mention)

        async def acknowledged(envelope_id: str) -> dict:
            return await slack.acks.wait_for(lambda acks: next((a for a in acks if a["envelope_id"] == envelope_id), None))

        await acknowledged(await slack.push("events_api", body))
        await harness.outcome(body["event_id"])
        await acknowledged(await slack.push("events_api", body, retry=1))  # a re-delivery
        await harness.outcome(body["event_id"], "slack.duplicate")

        payload = slack.command_payload("help", channel=CHANNEL, user=ANN, command="/idefics", response_id="R1")
        ack = await acknowledged(await slack.push("slash_commands", payload))
        assert "/idefics caption &lt;image url&gt;" in ack["payload"]["text"]
    assert len(slack.thread(CHANNEL, mention["ts"])) == 1 and len(tap.prompts) == 1


async def test_a_socket_that_stays_down_makes_run_exit_with_an_error(tmp_path, tiny_checkpoint, slack, logs, tap):
    """slack_sdk reconnects a dropped socket by itself; when Slack won't give it a new one, the bot
    says so, /healthz follows, and `run` ends with an error for a service manager to restart it."""
    config = slack_config(tmp_path, tiny_checkpoint, slack, mode="socket", app_token=APP_TOKEN, reconnect_timeout_s=1.0)
    bot = await BotRun(config).start(slack_started(logs))
    slack.fail("apps.connections.open", Failure(500, lasting=True))
    await slack.drop_sockets()
    with pytest.raises(CommandError, match=r"The slack connection was lost and couldn't be restored \(the Socket Mode connection has been down for \d+ s\)"):
        await asyncio.wait_for(bot.task, 60)
    said = [record.msg for record in logs.items]
    assert "slack.disconnected" in said and "slack.gave_up" in said


# -- start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"bot_token": "xoxb-revoked"}, "Slack refused the bot token (invalid_auth): check [slack] bot_token or SLACK_BOT_TOKEN"),
        ({"mode": "socket", "app_token": "xapp-wrong"}, "Slack refused the app token (invalid_auth): check [slack] app_token or SLACK_APP_TOKEN"),
    ],
)
async def test_start_up_problems_are_explained(tmp_path, tiny_checkpoint, slack, logs, tap, settings, message):
    config = slack_config(tmp_path, tiny_checkpoint, slack, **settings)
    with pytest.raises(ConfigError, match=re.escape(message)):
        async with running(config, logs, tap):
            pass


async def test_http_mode_says_when_its_port_is_taken(tmp_path, tiny_checkpoint, slack, logs, tap):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = slack_config(tmp_path, tiny_checkpoint, slack, http_port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match=r"Slack HTTP mode can't listen on 127.0.0.1:"):
            async with running(config, logs, tap):
                pass
