"""Slack's AI-app surfaces end to end: the assistant panel, native streaming and its fallback, the Stop
and feedback buttons, the "Describe image" shortcut, over HTTP and Socket Mode, on the fake Slack
(tests/fake_slack.py) with the real slack-bolt app started by `run_bot`, and the manifest."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import yaml

from adapters.slack import DESCRIBE, SCOPES
from adapters.slack_assistant import GREETING
from adapters.slack_blocks import DESCRIBE_IMAGE, FEEDBACK, STOP
from bot.state.store import SQLiteStore
from tests.bots import Harness, free_port, running
from tests.fake_slack import APP_TOKEN, FakeSlack, Posted
from tests.model_tap import tap  # noqa: F401 (a fixture)
from tests.test_slack import ALSO_TWO_PROCESSES, ANN, BOB, CHANNEL, DM, harness, logs, processes, red_and_blue, slack, slack_config, start_bots  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def with_action(slack: FakeSlack, channel: str, action_id: str) -> Posted | None:
    """The bot's message in `channel` that shows the button `action_id` now, if any."""
    return next((m for m in slack.messages.values() if m.channel == channel and action_id in m.actions()), None)


async def interact(harness: Harness, payload: dict) -> None:
    delivery = await harness.slack.interact(harness.endpoint, payload)
    assert delivery.status == 200, delivery


async def responded(slack: FakeSlack, payload: dict) -> dict:
    """What the bot posted to the response_url of an interactivity `payload`."""
    response_id = payload["response_url"].rpartition("/")[2]
    return await slack.responses.wait_for(lambda items: next((body for rid, body in items if rid == response_id), None))


async def test_the_assistant_panel_greets_names_the_chat_and_streams_with_a_status(start_bots, slack, tap):
    harness = await start_bots(native_streaming=True)
    opened = slack.assistant_thread_started(DM, ANN)
    thread_ts = opened["assistant_thread"]["thread_ts"]
    event_id = await harness.send(opened)
    await harness.send(opened, event_id=event_id, retry=1)  # Slack's retry greets nobody twice
    await slack.calls.wait_for(lambda calls: any(c.method == "assistant.threads.setSuggestedPrompts" for c in calls))
    (greeting,) = slack.thread(DM, thread_ts)
    assert greeting.text == GREETING and [p["title"] for p in slack.suggested[(DM, thread_ts)]][:2] == ["Describe an image", "What's written here?"]

    red, _ = red_and_blue(slack)
    tap.say = "It says STOP to <!channel>"
    question = slack.message(DM, ANN, "What is written in this picture?", files=[red], thread_ts=thread_ts, channel_type="im", name="Ann")
    thread = await harness.answer(question)
    (answer,) = [message for message in thread if message.streaming is False]
    assert answer.text.startswith("It says STOP to &lt;!channel&gt;") and FEEDBACK in answer.actions()  # streamed text pings no one
    assert slack.titles[(DM, thread_ts)] == "What is written in this picture?"
    statuses = [status for channel, ts, status in slack.statuses.items if (channel, ts) == (DM, thread_ts)]
    assert statuses[0] == "is looking at your image…" and statuses[-1] == ""
    assert [STOP in message.actions() for message in slack.deleted] == [True]  # the Stop button went with the reply
    assert not slack.api("chat.update")  # streamed, not edited
    assert "User: What is written in this picture?" in tap.prompts[-1] and "[Ann]" not in tap.prompts[-1]

    follow_up = slack.message(DM, ANN, "And in French?", thread_ts=thread_ts, channel_type="im", name="Ann")
    await harness.answer(follow_up)
    assert "What is written in this picture?" in tap.prompts[-1]  # the same conversation
    assert len(slack.api("assistant.threads.setTitle")) == 1  # named once, after its first question


async def test_a_workspace_that_refuses_streams_gets_edited_placeholders_decided_once(start_bots, slack, tap, logs):
    harness = await start_bots(native_streaming=True)
    slack.refuse_streaming = "feature_not_enabled"
    tap.say = "A red square"
    first = slack.mention(CHANNEL, ANN, "What is this?")
    (reply,) = await harness.answer(first)
    assert reply.texts[0] == "_Thinking…_" and reply.text.startswith("A red square")
    assert FEEDBACK in reply.actions() and STOP not in reply.actions()
    second = slack.mention(CHANNEL, BOB, "And this?")
    await harness.answer(second)
    assert len(slack.api("chat.startStream")) == 1  # the workspace's answer is kept
    refusals = [r for r in logs.items if r.msg == "slack.streaming_unavailable"]
    assert [r.error for r in refusals] == ["feature_not_enabled"]


@ALSO_TWO_PROCESSES  # a click may reach the process that doesn't write the reply
async def test_stop_is_for_the_asker_and_keeps_what_was_written(start_bots, slack, tap):
    harness = await start_bots(native_streaming=True)
    tap.say, tap.finish = "A red square on", False
    tap.gate.clear()
    mention = slack.mention(CHANNEL, ANN, "Describe it at length")
    event_id = await harness.send(mention)
    control = await slack.calls.wait_for(lambda calls: with_action(slack, CHANNEL, STOP))
    await tap.wait_held()
    await slack.calls.wait_for(lambda calls: any(m.streaming and m.text == "A red square on" for m in slack.thread(CHANNEL, mention["ts"])))

    refused = slack.click(control, STOP, BOB)
    await interact(harness, refused)
    assert (await responded(slack, refused))["text"] == "Only the person who asked can stop this answer."
    await interact(harness, slack.click(control, STOP, ANN))
    await harness.outcome(event_id)
    tap.gate.set()

    (answer,) = slack.thread(CHANNEL, mention["ts"])
    assert answer.streaming is False and answer.text.startswith("A red square on") and "_Stopped by u0000001._" in answer.text
    assert FEEDBACK not in answer.actions()  # nothing was kept to rate
    assert slack.deleted == [control]


@ALSO_TWO_PROCESSES  # a click may reach the process that doesn't write the reply
async def test_anyone_may_stop_when_configured_and_a_finished_reply_says_so(start_bots, slack, tap):
    harness = await start_bots(native_streaming=False, anyone_can_stop=True)
    tap.say, tap.finish = "Blue", False
    tap.gate.clear()
    mention = slack.mention(CHANNEL, ANN, "Describe it")
    event_id = await harness.send(mention)
    placeholder = await slack.calls.wait_for(lambda calls: with_action(slack, CHANNEL, STOP))
    await slack.calls.wait_for(lambda calls: placeholder.text == "Blue")
    bobs, late = slack.click(placeholder, STOP, BOB), slack.click(placeholder, STOP, ANN)
    await interact(harness, bobs)
    await harness.outcome(event_id)
    tap.gate.set()
    assert placeholder.text.startswith("Blue") and "_Stopped by u0000002._" in placeholder.text and not placeholder.actions()
    await interact(harness, late)  # Ann's click was on its way while the reply ended
    assert (await responded(slack, late))["text"] == "That answer is already finished."


async def test_feedback_is_kept_with_its_answer_and_counted(tmp_path, tiny_checkpoint, slack, logs, tap):
    health = free_port()
    config = slack_config(tmp_path, tiny_checkpoint, slack, extra=f"[health]\nenabled = true\nport = {health}\n")
    async with running(config, logs, tap):
        harness = Harness(slack, config, logs, tap)
        (answer,) = await harness.answer(slack.mention(CHANNEL, ANN, "What is this?"))
        _, buttons = answer.actions()[FEEDBACK]
        up, down = buttons["positive_button"]["value"], buttons["negative_button"]["value"]
        for user, value in ((ANN, up), (BOB, up), (BOB, down)):  # Bob changes his mind: his last vote counts
            click = slack.click(answer, FEEDBACK, user, value=value)
            await interact(harness, click)
            assert (await responded(slack, click))["text"] == "Thanks for the feedback!"
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{health}/metrics") as response:
            metrics = await response.text()
    assert 'idefics_feedback_total{outcome="recorded",platform="slack",vote="up"} 2.0' in metrics
    assert 'idefics_feedback_total{outcome="recorded",platform="slack",vote="down"} 1.0' in metrics
    store = await SQLiteStore.open(config.state.path)
    try:
        turn = int(up.split()[1])
        assert await store.feedback_of(turn) == {ANN: "up", BOB: "down"}
        assert (await store.load_turns(await store.conversation_of("slack", f"{CHANNEL}/{answer.thread_ts}")))[-1].id == turn
    finally:
        await store.close()


async def test_describe_image_answers_in_the_messages_thread(start_bots, slack, tap):
    harness = await start_bots(native_streaming=True)
    red, _ = red_and_blue(slack)
    photo = slack.message(CHANNEL, BOB, "holiday pics", files=[red], name="Bob")
    shortcut = slack.shortcut(DESCRIBE_IMAGE, photo, ANN)
    await interact(harness, shortcut)
    described = await harness.logs.wait_for(lambda records: next((r for r in records if r.msg == "slack.described"), None))
    assert described.conversation == f"slack:{CHANNEL}:{photo['ts']}" and described.answered
    (answer,) = slack.thread(CHANNEL, photo["ts"])
    assert answer.streaming is False and f"User: [u0000001] {DESCRIBE}" in tap.prompts[-1] and "<image>" in tap.prompts[-1]

    follow_up = slack.message(CHANNEL, ANN, "Is it sunny there?", thread_ts=photo["ts"], name="Ann")
    await harness.answer(follow_up)  # the thread is the bot's now: no mention needed
    assert len(slack.thread(CHANNEL, photo["ts"])) == 2

    words = slack.shortcut(DESCRIBE_IMAGE, slack.message(CHANNEL, BOB, "just words"), ANN)
    await interact(harness, words)
    assert (await responded(slack, words))["text"] == "That message has no image attached."


async def test_buttons_work_over_socket_mode(tmp_path, tiny_checkpoint, slack, logs, tap):
    config = slack_config(tmp_path, tiny_checkpoint, slack, mode="socket", app_token=APP_TOKEN)
    async with running(config, logs, tap):
        tap.say, tap.finish = "Thinking hard", False
        tap.gate.clear()
        mention = slack.mention(CHANNEL, ANN, "Over the socket")
        await slack.push("events_api", slack.envelope(mention))
        placeholder = await slack.calls.wait_for(lambda calls: with_action(slack, CHANNEL, STOP))
        envelope = await slack.push("interactive", slack.click(placeholder, STOP, ANN))
        await slack.acks.wait_for(lambda acks: any(a.get("envelope_id") == envelope for a in acks))
        await logs.wait_for(lambda records: any(r.msg == "slack.replied" for r in records))
        tap.gate.set()
    assert "_Stopped by u0000001._" in placeholder.text


def test_the_manifest_asks_for_what_the_adapter_uses_and_the_readme_shows_it():
    text = (ROOT / "slack-manifest.yml").read_text(encoding="utf-8")
    manifest = yaml.safe_load(text)
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == SCOPES
    assert {"assistant_thread_started", "assistant_thread_context_changed", "app_mention", "message.im"} <= set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert [s["callback_id"] for s in manifest["features"]["shortcuts"]] == [DESCRIBE_IMAGE]
    assert manifest["settings"]["interactivity"]["is_enabled"] and "assistant_view" in manifest["features"]
    assert text.strip() in (ROOT / "README.md").read_text(encoding="utf-8")
