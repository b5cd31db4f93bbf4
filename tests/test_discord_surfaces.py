"""Discord's surfaces end to end: the Stop and Regenerate buttons on answers (persistent across a
restart), commands for user installs answered through the interaction, and command publishing only
when the command set changed, by one process or `idefics-bot sync-commands`; a real discord.Client
started by `run_bot` against the fake Discord (tests/fake_discord.py)."""

from __future__ import annotations

import asyncio

from adapters.discord.delivery import CUT
from bot.runtime.cli import main
from tests.bots import bot_says, command_answer, thread_of
from tests.conftest import image_bytes
from tests.fake_discord import FakeDiscord
from tests.fake_tgi import FakeTGI, Reply
from tests.test_discord import RunningBot, discord_config, no_errors  # noqa: F401 (fixtures)
from tests.test_discord import fake as fake
from tests.test_discord import start_bot as start_bot

CUT_NOTE = CUT.split(",")[0]  # as shown in italics, with Markdown escaped

EPHEMERAL = 64


def button_ids(message: dict) -> list[str]:
    return [button["custom_id"] for row in message.get("components", []) for button in row["components"]]


async def with_button(fake: FakeDiscord, channel: dict, prefix: str) -> dict:
    """The bot's message in `channel` that has a button whose custom_id starts with `prefix`."""
    return await fake.wait_for(lambda: next((m for m in fake.bot_messages(channel["id"]) if any(c.startswith(prefix) for c in button_ids(m))), None))


def notice(interaction) -> str:
    """The note only the presser sees (an ephemeral message answering the press)."""
    (response,) = interaction.responses
    assert response["type"] == 4 and response["data"]["flags"] & EPHEMERAL, response
    return response["data"]["content"]


async def test_stop_is_for_the_asker_and_keeps_what_was_written(fake, start_bot, tap):
    await start_bot()
    ann, bob = fake.user("Ann"), fake.user("Bob")
    tap.say, tap.finish = "A red square on", False
    tap.gate.clear()
    question = await fake.say(ann, fake.text_channel, "Describe it at length", mention=True)
    thread = await thread_of(fake, question)
    answer = await with_button(fake, thread, "idefics:stop:")
    await tap.wait_held()
    await bot_says(fake, thread, "A red square on")
    stop = f"idefics:stop:{question['id']}"
    assert button_ids(answer) == [stop]

    refused = await fake.press(bob, answer, stop)
    await fake.wait_for(lambda: refused.responses)
    assert notice(refused) == "Only the person who asked can stop this answer."
    stopped = await fake.press(ann, answer, stop)
    await bot_says(fake, thread, "A red square on\n\n*Stopped by Ann.*")
    assert [response["type"] for response in stopped.responses] == [6]  # acknowledged; the message shows the rest
    assert await fake.wait_for(lambda: fake.messages[answer["id"]].get("components") == [])  # no Regenerate: nothing was kept
    tap.gate.set()


async def test_regenerate_replaces_the_latest_answer_and_works_after_a_restart(fake, start_bot, tap):
    bot = await start_bot()
    ann, bob = fake.user("Ann"), fake.user("Bob")
    tap.say = "first answer"
    question = await fake.say(ann, fake.text_channel, "What is it?", mention=True)
    thread = await thread_of(fake, question)
    first = await with_button(fake, thread, "idefics:regenerate:")
    assert first["content"] == "first answer" and button_ids(first)[0].endswith(f":{ann['id']}")
    regenerate = button_ids(first)[0]

    refused = await fake.press(bob, first, regenerate)
    await fake.wait_for(lambda: refused.responses)
    assert notice(refused) == "Only the person who asked can have this answer written again."

    tap.say = "second answer"
    await fake.press(ann, first, regenerate)
    second = await with_button(fake, thread, "idefics:regenerate:")
    await bot_says(fake, thread, "second answer")
    assert fake.messages[first["id"]]["components"] == []  # the replaced answer lost its button
    assert "What is it?" in tap.prompt() and "first answer" not in tap.prompt()

    await bot.stop()
    await start_bot()  # the buttons of messages sent before the restart still work
    tap.say = "third answer"
    second = next(m for m in fake.bot_messages(thread["id"]) if m["content"] == "second answer")
    await fake.press(ann, second, button_ids(second)[0])
    await bot_says(fake, thread, "third answer")
    tap.say = "a follow-up"
    await fake.say(bob, thread, "Thanks, and the colour?")
    await bot_says(fake, thread, "a follow-up")
    history = tap.prompt()
    assert "third answer" in history and "second answer" not in history and "first answer" not in history

    latest = next(m for m in fake.bot_messages(thread["id"]) if m["content"] == "third answer")
    old = await fake.press(ann, latest, button_ids(latest)[0])  # no longer the latest answer
    await fake.wait_for(lambda: old.responses)
    assert notice(old) == "Only the latest answer of a conversation can be written again."


async def test_commands_installed_to_an_account_answer_through_the_interaction(fake, start_bot, tap):
    await start_bot(command_guild_ids=[])  # global commands: the ones user installs get
    published = {command["name"]: command for command in fake.commands["global"]}
    assert {"ask", "caption", "classify", "story", "Describe image"} <= set(published)
    assert all(command["integration_types"] == [0, 1] and sorted(command["contexts"]) == [0, 1, 2] for command in published.values())

    ann, bob = fake.user("Ann"), fake.user("Bob")
    red = fake.upload("red.png", image_bytes((220, 20, 20)), "image/png")
    elsewhere = fake.foreign_channel()
    tap.say = "a red square"
    asked = await fake.run_command(ann, elsewhere, "caption", {"image": red["id"]}, attachments={red["id"]: red})
    await command_answer(fake, asked, "a red square")

    group = fake.group_dm(ann, bob)
    photo = fake.unseen_message(bob, group, "look", attachments=(red,))
    tap.say = "a red square again"
    described = await fake.run_command(ann, group, "Describe image", target=photo)
    await command_answer(fake, described, "a red square again")
    posts = [call.path for call in fake.calls if call.method == "POST" and call.path.startswith("/channels/")]
    assert posts == []  # everything went through the interactions


async def test_commands_are_published_by_one_process_only_when_they_differ_from_discords(fake, start_bot, tmp_path, config):
    bot = await start_bot()
    assert fake.command_syncs == [fake.guild_id]
    await bot.stop()
    bot = await start_bot()
    assert fake.command_syncs == [fake.guild_id]  # the same commands: nothing sent at this start
    await bot.stop()

    # Changed elsewhere (another tool, or by hand): one command gone, one described differently.
    fake.commands[fake.guild_id] = [c for c in fake.commands[fake.guild_id] if c["name"] != "story"]
    next(c for c in fake.commands[fake.guild_id] if c["name"] == "ask")["description"] = "Something else"
    bot = await start_bot()
    assert fake.command_syncs == [fake.guild_id] * 2  # repaired
    names = {c["name"]: c for c in fake.commands[fake.guild_id]}
    assert "story" in names and names["ask"]["description"] == "Answer a question about an image."
    await bot.stop()

    bot = await start_bot(command_guild_ids=[])  # now global: a set Discord hasn't got yet, and the guild's copies go
    assert fake.command_syncs == [fake.guild_id] * 2 + ["global", fake.guild_id]
    assert fake.commands[fake.guild_id] == [] and len(fake.commands["global"]) == 7  # nobody sees every command twice
    await bot.stop()
    bot = await start_bot(command_guild_ids=[])
    assert fake.command_syncs == [fake.guild_id] * 2 + ["global", fake.guild_id]  # all agrees: nothing sent
    await bot.stop()
    await start_bot(command_guild_ids=["123"], shard_count=2, shard_ids=[1])  # shard 0's process publishes
    assert fake.command_syncs == [fake.guild_id] * 2 + ["global", fake.guild_id]

    path = tmp_path / "sync.toml"
    path.write_text(
        f"""
[model]
checkpoint = "{config.model.checkpoint}"
[state]
path = "{config.state.path}"
[discord]
token = "{fake.token}"
api_base_url = "{fake.api_base_url}"
gateway_url = "{fake.gateway_url}"
command_guild_ids = ["{fake.guild_id}"]
""",
        encoding="utf-8",
    )
    assert await asyncio.to_thread(main, ["sync-commands", "--config", str(path)]) == 0
    # On request, changed or not; and the global commands, no longer configured, go.
    assert fake.command_syncs == [fake.guild_id] * 2 + ["global", fake.guild_id] + [fake.guild_id, "global"]
    assert fake.commands["global"] == [] and len(fake.commands[fake.guild_id]) == 7


async def test_a_long_answer_through_a_user_installed_command_fits_in_its_five_follow_ups(fake, config):
    async with FakeTGI() as tgi:  # a remote model: a long answer at once
        model = config.model.model_copy(update={"backend": "tgi", "url": tgi.url})
        sections = {"model": model, "generation": config.generation.model_copy(update={"max_new_tokens": 1000})}
        bot = await RunningBot(discord_config(config, fake, command_guild_ids=[]).model_copy(update=sections), fake).start()
        tgi.replies.append(Reply([*(f" part{n:03d} of a very long answer." for n in range(700)), "<end_of_utterance>"]))  # ~21,000 characters
        red = fake.upload("red.png", image_bytes((220, 20, 20)), "image/png")
        question = {"question": "Tell me everything", "image": red["id"]}
        asked = await fake.run_command(fake.user("Ann"), fake.foreign_channel(), "ask", question, attachments={red["id"]: red})
        try:
            await fake.wait_for(lambda: any(CUT_NOTE in m["content"] for m in asked.followups), timeout=120)
        finally:
            await bot.stop()
    shown = [asked.original or "", *(m["content"] for m in asked.followups)]
    assert len(asked.followups) == 5 and CUT_NOTE in shown[-1] and all(len(text) <= 2000 for text in shown)
    assert shown[0].startswith("part000 of a very long answer.") and "part100 of" in shown[1]  # fuller messages, in order
