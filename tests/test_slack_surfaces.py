"""Slack's AI-app surfaces end to end: the assistant panel, native streaming and its fallback, the Stop
and feedback buttons, the "Describe image" shortcut, over HTTP and Socket Mode, on the fake Slack
(tests/fake_slack.py) with the real slack-bolt app started by `run_bot`, and the manifest."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import yaml

from adapters.slack.adapter import DESCRIBE, SCOPES, SlackSettings
from adapters.slack.assistant import GREETING
from adapters.slack.blocks import DESCRIBE_IMAGE, FEEDBACK, STOP
from adapters.slack.text import escape
from bot.state.store import SQLiteStore
from tests.bots import Harness, free_port, running
from tests.fake_slack import APP_TOKEN, Failure, FakeSlack, Posted
from tests.test_slack import ALSO_TWO_PROCESSES, ANN, BOB, CHANNEL, DM, OTHER_CHANNEL, processes, red_and_blue, slack_config  # noqa: F401 (fixtures)
from tests.test_slack import harness as harness
from tests.test_slack import logs as logs
from tests.test_slack import slack as slack
from tests.test_slack import start_bots as start_bots

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


@ALSO_TWO_PROCESSES
async def test_a_workspace_that_refuses_streams_gets_edited_placeholders_decided_once(start_bots, slack, tap, logs):
    harness = await start_bots(native_streaming=True)
    slack.refuse_streaming = "unknown_method"  # Slack's "This method is currently not available."
    tap.say = "A red square"
    first = slack.mention(CHANNEL, ANN, "What is this?")
    (reply,) = await harness.answer(first)
    assert reply.texts[0] == "_Thinking…_" and reply.text.startswith("A red square")
    assert FEEDBACK in reply.actions() and STOP not in reply.actions()
    for user in (BOB, ANN):  # with two processes, behind the load balancer each gets one of these
        await harness.answer(slack.mention(CHANNEL, user, "And this?"))
    assert len(slack.api("chat.startStream")) == 1  # the workspace's answer is kept, for every process
    refusals = [r for r in logs.items if r.msg == "slack.streaming_unavailable"]
    assert [r.error for r in refusals] == ["unknown_method"]


async def test_a_stream_refused_in_one_channel_or_thread_falls_back_for_that_reply_only(start_bots, slack, tap, logs):
    harness = await start_bots(native_streaming=True)
    tap.say = "A red square"
    for error in ("channel_type_not_supported", "restricted_action_thread_locked", "ekm_access_denied", "message_limit_exceeded"):
        slack.fail("chat.startStream", Failure(200, error))
        (reply,) = await harness.answer(slack.mention(CHANNEL, ANN, "What is this?"))
        assert reply.texts[0] == "_Thinking…_" and reply.text.startswith("A red square") and FEEDBACK in reply.actions()
    # "Describe image" on a message in a channel the bot isn't in: that reply can't be posted at all...
    slack.outside.add(OTHER_CHANNEL)
    red, _ = red_and_blue(slack)
    shortcut = slack.shortcut(DESCRIBE_IMAGE, slack.message(OTHER_CHANNEL, BOB, "look", files=[red]), ANN)
    await interact(harness, shortcut)
    assert (await responded(slack, shortcut))["text"].startswith("I can't post in this conversation: invite me")
    # ...and the workspace still streams.
    (streamed,) = await harness.answer(slack.mention(CHANNEL, BOB, "And this?"))
    assert streamed.streaming is False and streamed.text.startswith("A red square") and FEEDBACK in streamed.actions()
    assert not [r for r in logs.items if r.msg == "slack.streaming_unavailable"]


async def test_a_stream_is_for_the_asker_and_their_own_team(start_bots, slack, tap):
    harness = await start_bots(native_streaming=True)
    slack.teams[BOB] = "T0000002"  # Bob is in the channel through Slack Connect
    tap.say = "A red square"
    (streamed,) = await harness.answer(slack.mention(CHANNEL, BOB, "What is this?"))
    assert streamed.streaming is False and (streamed.recipient, streamed.recipient_team) == (BOB, "T0000002")
    assert streamed.text.startswith("A red square") and not slack.api("chat.update")


async def test_stop_is_there_at_once_while_a_streamed_answer_waits(start_bots, slack, tap):
    harness = await start_bots(native_streaming=True)
    tap.say, tap.finish = "", False  # the model holds before its first word, as for a long queue
    tap.gate.clear()
    mention = slack.mention(CHANNEL, ANN, "Describe it at length")
    event_id = await harness.send(mention)
    control = await slack.calls.wait_for(lambda calls: with_action(slack, CHANNEL, STOP))
    await tap.wait_held()
    assert not slack.api("chat.startStream")  # nothing written yet, and already stoppable
    await interact(harness, slack.click(control, STOP, ANN))
    await harness.outcome(event_id)
    tap.gate.set()
    (answer,) = slack.thread(CHANNEL, mention["ts"])
    assert answer.streaming is False and answer.text == "_Stopped by u0000001._" and slack.deleted == [control]


async def test_a_stream_that_slack_closes_goes_on_in_messages_with_nothing_lost(start_bots, slack, tap):
    harness = await start_bots(native_streaming=True)
    tap.say, tap.finish = "A red square on a white", False
    tap.gate.clear()
    mention = slack.mention(CHANNEL, ANN, "Describe it at length")
    event_id = await harness.send(mention)
    stream = await slack.calls.wait_for(lambda calls: next((m for m in slack.thread(CHANNEL, mention["ts"]) if m.streaming), None))
    await tap.wait_held()
    await slack.calls.wait_for(lambda calls: stream.text == "A red square on a white")
    slack.close_stream(stream)
    tap.gate.set()  # the model goes on, and the bot's next append or the stop finds the stream closed
    await harness.outcome(event_id)
    streamed, rest = slack.thread(CHANNEL, mention["ts"])
    assert streamed is stream and stream.text == "A red square on a white" and not stream.actions()
    assert rest.text.startswith("…") and FEEDBACK in rest.actions() and STOP not in rest.actions()
    await all_shown(harness, mention, stream, rest)


async def test_a_stream_that_slack_closes_while_the_model_is_slow_goes_on_as_the_model_does(start_bots, slack, tap):
    harness = await start_bots(native_streaming=True)
    slack.streams_close_at_once = True  # so the bot's first append finds it closed
    tap.say, tap.finish = "A red square on a white", False
    tap.gate.clear()
    mention = slack.mention(CHANNEL, ANN, "Describe it at length")
    event_id = await harness.send(mention)
    await tap.wait_held()
    # The rest goes on in a message while the model is still held...
    rest = await slack.calls.wait_for(lambda calls: next((m for m in slack.thread(CHANNEL, mention["ts"]) if m.text.startswith("…")), None))
    assert STOP in rest.actions()
    tap.gate.set()  # ...and takes what the model says next
    await harness.outcome(event_id)
    stream, shown_rest = slack.thread(CHANNEL, mention["ts"])
    assert shown_rest is rest and stream.streaming is False and FEEDBACK in rest.actions() and STOP not in rest.actions()
    await all_shown(harness, mention, stream, rest)


async def all_shown(harness: Harness, question: dict, stream: Posted, rest: Posted) -> None:
    """The stored answer to `question` is all in its thread: in the closed `stream`, then in `rest`."""
    store = await SQLiteStore.open(harness.config.state.path)
    try:
        answer = (await store.load_turns(await store.conversation_of("slack", f"{CHANNEL}/{question['ts']}")))[-1]
    finally:
        await store.close()
    shown = escape(answer.text)
    assert shown.startswith(stream.text) and len(shown) > len(stream.text)
    assert rest.text.removeprefix("…").startswith(shown[len(stream.text) :].strip())


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
    assert {"assistant_thread_started", "assistant_thread_context_changed", "app_mention", "message.im"} <= set(
        manifest["settings"]["event_subscriptions"]["bot_events"]
    )
    assert [s["callback_id"] for s in manifest["features"]["shortcuts"]] == [DESCRIBE_IMAGE]
    assert manifest["settings"]["interactivity"]["is_enabled"] and "assistant_view" in manifest["features"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.strip() in readme and manifest["settings"]["socket_mode_enabled"]


def test_the_http_mode_manifest_gives_slack_the_bots_address_for_everything():
    socket = yaml.safe_load((ROOT / "slack-manifest.yml").read_text(encoding="utf-8"))
    http = yaml.safe_load((ROOT / "slack-manifest-http.yml").read_text(encoding="utf-8"))
    address = "https://bot.example.com" + SlackSettings().events_path  # Bolt takes all three on one path
    settings, (command,) = http["settings"], http["features"]["slash_commands"]
    assert settings["socket_mode_enabled"] is False
    assert settings["event_subscriptions"]["request_url"] == settings["interactivity"]["request_url"] == command["url"] == address
    # Otherwise the same app: the same scopes, events, shortcut and command.
    settings.update(socket_mode_enabled=True)
    del settings["event_subscriptions"]["request_url"], settings["interactivity"]["request_url"], command["url"]
    assert http == socket
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "`slack-manifest-http.yml`, **HTTP mode**" in readme and "`slack-manifest.yml`, **Socket Mode**" in readme
