"""The fakes' AI-app and interactivity surfaces refuse what Slack and Discord refuse, driven by the real
clients (slack_sdk, slack-bolt) and plain REST calls on 127.0.0.1, so the adapter tests built on them
can fail for the right reasons."""

from __future__ import annotations

import aiohttp
import pytest
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp, AsyncAssistant
from slack_sdk.errors import SlackApiError
from slack_sdk.models.blocks import ActionsBlock, ButtonElement, ContextActionsBlock, FeedbackButtonObject, FeedbackButtonsElement
from slack_sdk.web.async_client import AsyncWebClient

from tests.bots import free_port
from tests.fake_discord import FakeDiscord
from tests.fake_slack import APP_TOKEN, BOT_TOKEN, SIGNING_SECRET, TEAM, FakeSlack, Journal

DM, CHANNEL, ANN = "D0000001", "C0000001", "U0000001"


@pytest.fixture
async def slack():
    async with FakeSlack() as fake:
        yield fake
    assert not fake.unexpected


def client_of(slack: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url)


async def refused(call) -> str:
    with pytest.raises(SlackApiError) as error:
        await call
    return error.value.response["error"]


def buttons() -> list[dict]:
    stop = ActionsBlock(elements=[ButtonElement(text="Stop", action_id="stop", value="42")])
    feedback = FeedbackButtonsElement(
        action_id="feedback", positive_button=FeedbackButtonObject(text="Good", value="good"), negative_button=FeedbackButtonObject(text="Bad", value="bad")
    )
    return [stop.to_dict(), ContextActionsBlock(elements=[feedback]).to_dict()]


async def test_a_stream_grows_in_its_thread_and_takes_no_text_once_stopped(slack):
    client = client_of(slack)
    stream = await client.chat_stream(channel=CHANNEL, thread_ts="1.000001", recipient_team_id=TEAM, recipient_user_id=ANN, buffer_size=1)
    await stream.append(markdown_text="A red ")
    assert await refused(client.chat_update(channel=CHANNEL, ts=stream.ts, text="edited")) == "cant_update_message"
    await stream.append(markdown_text="square.")
    await stream.stop(blocks=buttons())
    posted = slack.messages[stream.ts]
    assert posted.texts == ["A red ", "A red square.", "A red square."] and posted.thread_ts == "1.000001" and posted.streaming is False
    assert set(posted.actions()) == {"stop", "feedback"}
    assert await refused(client.chat_appendStream(channel=CHANNEL, ts=stream.ts, markdown_text="more")) == "message_not_in_streaming_state"
    assert await refused(client.chat_stopStream(channel=CHANNEL, ts=stream.ts)) == "message_not_in_streaming_state"


async def test_a_stream_outside_dms_names_its_recipient_and_a_workspace_can_refuse_streams(slack):
    client = client_of(slack)
    assert await refused(client.chat_startStream(channel=CHANNEL, thread_ts="1.000001", markdown_text="hi")) == "missing_recipient_user_id"
    assert (
        await refused(client.chat_startStream(channel=CHANNEL, thread_ts="1.000001", markdown_text="hi", recipient_user_id=ANN)) == "missing_recipient_team_id"
    )
    slack.teams[ANN] = "T0000002"  # in the channel through Slack Connect: her team, not the bot's
    assert await refused(client.chat_startStream(channel=CHANNEL, thread_ts="1.000001", recipient_user_id=ANN, recipient_team_id=TEAM)) == "user_not_found"
    assert (await client.chat_startStream(channel=CHANNEL, thread_ts="1.000001", recipient_user_id=ANN, recipient_team_id="T0000002"))["ok"]
    slack.outside.add("C0000009")
    assert (
        await refused(client.chat_startStream(channel="C0000009", thread_ts="1.000001", recipient_user_id=ANN, recipient_team_id="T0000002"))
        == "not_in_channel"
    )
    assert (await client.chat_startStream(channel=DM, thread_ts="1.000001", markdown_text="hi"))["ok"]
    assert await refused(client.chat_startStream(channel=DM, thread_ts="1.000001", markdown_text="x" * 12_001)) == "msg_too_long"
    slack.refuse_streaming = "unknown_method"
    assert await refused(client.chat_startStream(channel=DM, thread_ts="1.000001", markdown_text="hi")) == "unknown_method"


async def test_blocks_are_checked_and_only_buttons_on_the_message_can_be_clicked(slack):
    client = client_of(slack)
    twice = [ActionsBlock(elements=[ButtonElement(text="A", action_id="same"), ButtonElement(text="B", action_id="same")]).to_dict()]
    assert await refused(client.chat_postMessage(channel=CHANNEL, text="x", blocks=twice)) == "invalid_blocks"
    loose = [ActionsBlock(elements=[buttons()[1]["elements"][0]]).to_dict()]
    assert await refused(client.chat_postMessage(channel=CHANNEL, text="x", blocks=loose)) == "invalid_blocks"

    posted = slack.messages[(await client.chat_postMessage(channel=CHANNEL, thread_ts="1.000001", text="answer", blocks=buttons()))["ts"]]
    click = slack.click(posted, "feedback", ANN, value="bad")
    assert click["actions"][0] | {"action_ts": None} == {
        "type": "feedback_buttons",
        "action_id": "feedback",
        "block_id": "b1",
        "value": "bad",
        "text": click["actions"][0]["text"],
        "action_ts": None,
    }
    assert click["container"] == {"type": "message", "message_ts": posted.ts, "channel_id": CHANNEL, "is_ephemeral": False, "thread_ts": "1.000001"}
    with pytest.raises(AssertionError, match="no 'regenerate'"):
        slack.click(posted, "regenerate", ANN)
    await client.chat_update(channel=CHANNEL, ts=posted.ts, text="answer", blocks=[])
    with pytest.raises(AssertionError, match="no 'stop'"):
        slack.click(posted, "stop", ANN)  # the button is gone from the message
    await client.chat_delete(channel=CHANNEL, ts=posted.ts)
    assert slack.deleted == [posted] and await refused(client.chat_delete(channel=CHANNEL, ts=posted.ts)) == "message_not_found"


async def test_assistant_threads_want_the_scope_and_titles_and_prompts_an_assistant_thread(slack):
    client = client_of(slack)
    started = slack.assistant_thread_started(DM, ANN)
    thread_ts = started["assistant_thread"]["thread_ts"]
    await client.assistant_threads_setStatus(channel_id=DM, thread_ts=thread_ts, status="is looking at your image…")
    await client.assistant_threads_setTitle(channel_id=DM, thread_ts=thread_ts, title="A red square")
    await client.assistant_threads_setSuggestedPrompts(channel_id=DM, thread_ts=thread_ts, prompts=[{"title": "Describe", "message": "Describe this image"}])
    assert slack.statuses.items == [(DM, thread_ts, "is looking at your image…")] and slack.titles == {(DM, thread_ts): "A red square"}
    assert await refused(client.assistant_threads_setTitle(channel_id=CHANNEL, thread_ts="1.000001", title="t")) == "thread_not_found"
    five = [{"title": str(n), "message": str(n)} for n in range(5)]
    assert await refused(client.assistant_threads_setSuggestedPrompts(channel_id=DM, thread_ts=thread_ts, prompts=five)) == "invalid_arguments"
    slack.scopes = tuple(scope for scope in slack.scopes if scope != "assistant:write")
    assert await refused(client.assistant_threads_setStatus(channel_id=DM, thread_ts=thread_ts, status="")) == "missing_scope"


@pytest.mark.parametrize("mode", ["http", "socket"])
async def test_bolt_gets_clicks_shortcuts_and_assistant_events_from_the_fake(slack, mode):
    """The payloads are shaped as Bolt expects them: it routes each to its listener, over either transport."""
    seen = Journal()
    app = AsyncApp(client=client_of(slack), signing_secret=SIGNING_SECRET, request_verification_enabled=mode == "http")
    assistant = AsyncAssistant()

    @assistant.thread_started
    async def started(set_suggested_prompts, payload):
        await set_suggested_prompts(prompts=["Describe an image"])
        seen.add(("started", payload["assistant_thread"]["thread_ts"]))

    @assistant.thread_context_changed
    async def moved(payload):
        seen.add(("context", payload["assistant_thread"]["context"]["channel_id"]))

    app.assistant(assistant)

    @app.action("stop")
    async def stop(ack, body):
        await ack()
        seen.add(("stop", body["user"]["id"], body["actions"][0]["value"]))

    @app.shortcut("describe_image")
    async def describe(ack, shortcut):
        await ack()
        seen.add(("shortcut", shortcut["message"]["ts"]))

    posted = slack.messages[(await app.client.chat_postMessage(channel=CHANNEL, text="answer", blocks=buttons()))["ts"]]
    question = slack.message(CHANNEL, ANN, "look", files=[slack.add_file("red.png", b"png")])
    opened = slack.assistant_thread_started(DM, ANN)
    events = [slack.envelope(opened), slack.envelope(slack.assistant_context_changed(opened, CHANNEL))]
    payloads = [slack.click(posted, "stop", ANN), slack.shortcut("describe_image", question, ANN)]
    if mode == "http":
        port = free_port()
        runner = aiohttp.web.AppRunner(app.web_app(path="/slack/events"))
        await runner.setup()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
        endpoint = f"http://127.0.0.1:{port}/slack/events"
        try:
            deliveries = [await slack.deliver(endpoint, body) for body in events] + [await slack.interact(endpoint, p) for p in payloads]
            assert [delivery.status for delivery in deliveries] == [200] * 4
            await seen.wait_for(lambda items: len(items) == 4, timeout=30)
            unsigned = await slack._post(endpoint, b"payload=%7B%7D", {"Content-Type": "application/x-www-form-urlencoded"}, "wrong-secret", 0.0)
            assert unsigned.status == 401
        finally:
            await runner.cleanup()
    else:
        handler = AsyncSocketModeHandler(app, APP_TOKEN)
        handler.client.wss_uri = (await app.client.apps_connections_open(app_token=APP_TOKEN))["url"]
        await handler.connect_async()
        try:
            envelopes = [await slack.push("events_api", body) for body in events] + [await slack.push("interactive", p) for p in payloads]
            await slack.acks.wait_for(lambda acks: {a.get("envelope_id") for a in acks} >= set(envelopes), timeout=30)
            await seen.wait_for(lambda items: len(items) == 4, timeout=30)
        finally:
            await handler.close_async()
    assert sorted(seen.items) == sorted(
        [("started", opened["assistant_thread"]["thread_ts"]), ("context", CHANNEL), ("stop", ANN, "42"), ("shortcut", question["ts"])]
    )
    assert slack.suggested == {(DM, opened["assistant_thread"]["thread_ts"]): [{"title": "Describe an image", "message": "Describe an image"}]}


# -- Discord -----------------------------------------------------------------------------------


@pytest.fixture
async def discord_fake():
    async with FakeDiscord() as fake:
        yield fake
    assert not fake.unknown


async def rest(fake: FakeDiscord, method: str, path: str, body=None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession(headers=headers) as session, session.request(method, fake.api_base_url + path, json=body) as response:
        return response.status, await response.json() if response.status != 204 else {}


def row(*custom_ids: str) -> dict:
    return {"type": 1, "components": [{"type": 2, "style": 2, "label": c, "custom_id": c} for c in custom_ids]}


async def test_discord_checks_buttons_and_keeps_them_to_the_bots_messages(discord_fake):
    fake, channel = discord_fake, discord_fake.text_channel
    assert (await rest(fake, "POST", f"/channels/{channel['id']}/messages", {"content": "x", "components": [row("a", "a")]}))[1]["code"] == 50035
    assert (await rest(fake, "POST", f"/channels/{channel['id']}/messages", {"content": "x", "components": [row("x" * 101)]}))[1]["code"] == 50035
    status, message = await rest(fake, "POST", f"/channels/{channel['id']}/messages", {"content": "answer", "components": [row("stop")]})
    assert status == 200 and fake.messages[message["id"]]["components"] == [row("stop")]

    ann = fake.user("Ann")
    someone = fake._message(channel["id"], ann, "mine")
    status, error = await rest(fake, "PATCH", f"/channels/{channel['id']}/messages/{someone['id']}", {"components": [row("stop")]})
    assert (status, error["code"]) == (403, 50005)
    with pytest.raises(AssertionError, match="only the bot's messages"):
        await fake.press(ann, someone, "stop")
    with pytest.raises(AssertionError, match="no button 'regenerate'"):
        await fake.press(ann, message, "regenerate")
    await rest(fake, "PATCH", f"/channels/{channel['id']}/messages/{message['id']}", {"components": []})
    with pytest.raises(AssertionError, match="no button 'stop'"):
        await fake.press(ann, message, "stop")


async def test_discord_keeps_user_installs_to_their_interactions_and_counts_command_syncs(discord_fake):
    fake = discord_fake
    question = {"name": "question", "description": "What you want to know", "type": 3, "required": True}
    ask = {"name": "ask", "description": "Ask", "type": 1, "options": [question], "integration_types": [0, 1], "contexts": [0, 1, 2]}
    guild_only = {"name": "reset", "description": "Reset", "type": 1}
    status, _ = await rest(fake, "PUT", f"/applications/{fake.application_id}/commands", [{**ask, "name": "Ask Me"}])
    assert status == 400 and fake.command_syncs == []
    assert (await rest(fake, "PUT", f"/applications/{fake.application_id}/commands", [ask, guild_only]))[0] == 200
    assert fake.command_syncs == ["global"] and [c["name"] for c in (await rest(fake, "GET", f"/applications/{fake.application_id}/commands"))[1]] == [
        "ask",
        "reset",
    ]

    ann, elsewhere = fake.user("Ann"), fake.foreign_channel()
    with pytest.raises(AssertionError, match="not available to user installs"):
        await fake.run_command(ann, elsewhere, "reset")
    await fake.run_command(ann, elsewhere, "ask", {"question": "hi"})  # no gateway session: nobody to dispatch to
    status, error = await rest(fake, "POST", f"/channels/{elsewhere['id']}/messages", {"content": "hello"})
    assert (status, error["code"]) == (403, 50001)
    group = fake.group_dm(ann, fake.user("Bob"))
    assert (await rest(fake, "POST", f"/channels/{group['id']}/messages", {"content": "hello"}))[0] == 403
    assert fake._context_of(group) == (2, True) and fake._context_of(fake.dm_channel(ann)) == (1, False)
