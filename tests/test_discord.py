"""The Discord adapter end to end: a real discord.Client, started by `idefics-bot run`'s own start-up
path (`run_bot`), talks to a fake Discord on 127.0.0.1 (tests/fake_discord.py) and answers with the
tiny IDEFICS checkpoint. What the model really received is read off the model itself, through a
logits processor on the local backend (`tests.model_tap.ModelTap`)."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import aiohttp
import discord
import pytest
from PIL import Image

from adapters.discord.input import thread_name
from bot.runtime.cli import CommandError
from bot.runtime.config import Config
from bot.settings import ConfigError
from ground.messages import Attachment
from tests.bots import BotRun, bot_says, command_answer, discord_connected, discord_section, free_port, logged, thread_of
from tests.conftest import BOTH_FAMILIES, image_bytes, write_config
from tests.fake_discord import FakeDiscord, RestFailure
from tests.test_images import truncated_jpeg


def pings_no_one(call) -> bool:
    """Whether a posted or edited message's `allowed_mentions` let nothing in it ping anybody."""
    allowed = call.body.get("allowed_mentions")
    return allowed is not None and allowed.get("parse") == [] and not allowed.get("users") and not allowed.get("roles") and not allowed.get("replied_user")


@pytest.fixture
async def fake():
    async with FakeDiscord() as server:
        yield server
        assert server.unknown == [], f"the bot called routes the fake doesn't know: {server.unknown}"


@pytest.fixture(autouse=True)
def no_errors(caplog):
    """Fail a test if discord.py or the adapter logged an error (an event handler raised, say)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def discord_config(config: Config, fake: FakeDiscord, **settings) -> Config:
    # /ask link: the fake's images are on 127.0.0.1, which links may not reach by default.
    images = config.images.model_copy(update={"allowed_hosts": ["127.0.0.1"]})
    return config.model_copy(update={"discord": discord_section(fake, **settings), "images": images})


class RunningBot(BotRun):
    """`idefics-bot run` in this event loop, connected to `fake`, stopped by the test."""

    def __init__(self, config: Config, fake: FakeDiscord):
        super().__init__(config)
        self.fake = fake

    async def start(self) -> RunningBot:
        return await super().start(discord_connected(self.fake))


@pytest.fixture
async def start_bot(config, fake, tap):
    """Starts the bot with [discord] settings (and whole config sections replaced by `sections`)."""
    running: list[RunningBot] = []

    async def start(sections: dict | None = None, **settings) -> RunningBot:
        started = await RunningBot(discord_config(config, fake, **settings).model_copy(update=sections or {}), fake).start()
        running.append(started)
        return started

    yield start
    tap.gate.set()
    for started in running:
        if not started.task.done():
            await started.stop()


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, "PNG")  # one bit per pixel: a big image in a small file
    return buffer.getvalue()


# -- conversations -----------------------------------------------------------------------------


@BOTH_FAMILIES
async def test_a_mention_with_an_image_opens_a_thread_that_continues_without_mentions(fake, start_bot, tap):
    await start_bot()
    ann, bob = fake.user("Ann"), fake.user("Bob")
    red = fake.upload("red.png", image_bytes((255, 0, 0)), "image/png")
    first = tap.force_next("a red square")
    question = await fake.say(ann, fake.text_channel, "What is in this image?", mention=True, attachments=(red,))

    thread = await thread_of(fake, question)
    assert thread["parent_id"] == fake.text_channel["id"] and thread["owner_id"] == fake.bot["id"]
    assert thread["name"] == "What is in this image?"
    await bot_says(fake, thread, first)
    assert fake.bot_messages(fake.text_channel["id"]) == []  # nothing inline: the answer is in the thread
    assert any(call.path == f"/channels/{thread['id']}/typing" for call in fake.calls)

    second = tap.force_next("a blue square")
    blue = fake.upload("blue.png", image_bytes((0, 0, 255)), "image/png")
    await fake.say(bob, thread, "And this one?", attachments=(blue,))  # no mention needed in the thread
    await bot_says(fake, thread, second)
    # What the model read for the second answer: both turns, both images, each speaker named.
    seen = tap.prompt()
    assert tap.images(seen) == 2
    assert seen.index("User: [Ann] What is in this image?") < seen.index(f"Assistant: {first}") < seen.index("User: [Bob] And this one?")

    writes = fake.writes()
    assert len(writes) >= 2 and all(pings_no_one(call) for call in writes), [call.body for call in writes]


async def test_a_model_that_writes_mentions_pings_no_one(fake, start_bot, tap, config):
    await start_bot({"generation": config.generation.model_copy(update={"max_new_tokens": 200})})
    ann = fake.user("Ann")
    text = tap.force_next(f"@everyone @here <@{ann['id']}> <@&{fake.role['id']}>")
    question = await fake.say(ann, fake.text_channel, "say hi to everyone", mention=True)
    await bot_says(fake, await thread_of(fake, question), text)
    assert all(pings_no_one(call) for call in fake.writes())


async def test_messages_that_are_not_for_the_bot_are_left_alone(fake, start_bot, tap):
    await start_bot()
    ann = fake.user("Ann")
    people_thread, _ = await fake.start_forum_post(ann, "Our cats", "look at my cat")  # no mention
    await fake.say(ann, fake.text_channel, "just chatting with friends")
    answer = tap.force_next("hello ann")
    await bot_says(fake, await thread_of(fake, await fake.say(ann, fake.text_channel, "hello", mention=True)), answer)
    assert len(tap.prompts) == 1 and "just chatting" not in tap.prompt() and "look at my cat" not in tap.prompt()
    assert fake.bot_messages(people_thread["id"]) == []


async def test_a_forum_post_is_answered_inside_the_post(fake, start_bot, tap):
    await start_bot()
    ann = fake.user("Ann")
    answer = tap.force_next("a small cat")
    cat = fake.upload("cat.png", image_bytes(), "image/png")
    post, _ = await fake.start_forum_post(ann, "What breed?", "what breed is this?", mention=True, attachments=(cat,))
    await bot_says(fake, post, answer)
    follow_up = tap.force_next("a cat sitting")
    await fake.say(ann, post, "and what is it doing?")  # the bot is in this post now: no mention needed
    await bot_says(fake, post, follow_up)
    assert "what breed is this?" in tap.prompt() and tap.prompt().count("<image>") == 1
    assert not any(call.path.endswith("/threads") for call in fake.calls)  # no thread opened in a forum


async def test_dms_are_a_conversation_without_mentions(fake, start_bot, tap):
    await start_bot()
    ann = fake.user("Ann")
    dm = fake.dm_channel(ann)
    first = tap.force_next("a red square")
    await fake.say(ann, dm, "hello there", attachments=(fake.upload("cat.jpg", image_bytes(kind="JPEG"), "image/jpeg"),))
    await bot_says(fake, dm, first)
    second = tap.force_next("it is red")
    await fake.say(ann, dm, "and what colour is it?")
    await bot_says(fake, dm, second)
    seen = tap.prompt()
    # A DM is not shared: the speaker is not named; both turns are there.
    assert "User: hello there" in seen and "User: and what colour is it?" in seen and "[Ann]" not in seen
    assert seen.count("<image>") == 1


async def test_inline_mode_answers_as_replies_and_a_reply_chain_continues(fake, start_bot, tap):
    await start_bot(reply_in_thread=False)
    ann, bob = fake.user("Ann"), fake.user("Bob")
    channel = fake.text_channel
    first = tap.force_next("the first answer")
    question = await fake.say(ann, channel, "first question", mention=True)
    answer = await bot_says(fake, channel, first)
    assert fake.threads() == [] and str(answer["message_reference"]["message_id"]) == question["id"]

    second = tap.force_next("the second answer")
    await fake.say(bob, channel, "a follow-up", reply_to=answer)  # a reply to the bot, no mention
    await bot_says(fake, channel, second)
    assert "User: [Ann] first question" in tap.prompt() and "User: [Bob] a follow-up" in tap.prompt()

    third = tap.force_next("the third answer")
    await fake.say(ann, channel, "something else", mention=True)  # a new mention: a new conversation
    await bot_says(fake, channel, third)
    assert "first question" not in tap.prompt()


async def test_where_the_bot_may_not_open_a_thread_it_answers_as_a_reply(fake, start_bot, tap):
    fake.no_threads_in.add(fake.other_channel["id"])
    await start_bot()
    answer = tap.force_next("a red square")
    question = await fake.say(fake.user("Ann"), fake.other_channel, "what is this?", mention=True)
    reply = await bot_says(fake, fake.other_channel, answer)
    assert str(reply["message_reference"]["message_id"]) == question["id"] and fake.threads() == []


async def test_a_long_reply_is_split_at_boundaries_and_never_inside_code(fake, start_bot, tap, config):
    quiet = config.conversation.model_copy(update={"system_prompt": ""})
    longer = config.generation.model_copy(update={"max_new_tokens": 600})
    await start_bot({"conversation": quiet, "generation": longer})
    # Words the tiny model's tokenizer spells with few tokens, to keep the generation short.
    sentence = "these assistant white standing describe this picture black without grass sitting woman red assistant picture which that category car standing. "
    code = "```\n" + " describe this picture black without grass sitting woman\n" * 12 + "```"
    paragraphs = [sentence * 3] * 4 + [code] + [sentence * 3] * 7
    text = tap.force_next("\n\n".join(p.strip() for p in paragraphs))
    assert len(text) > 5000
    thread = await thread_of(fake, await fake.say(fake.user("Ann"), fake.text_channel, "tell me a long story", mention=True))

    def whole():
        return " ".join(" ".join(fake.bot_texts(thread["id"])).split()) == " ".join(text.split())

    await fake.wait_for(whole, timeout=300)
    messages = fake.bot_texts(thread["id"])
    assert len(messages) >= 3 and all(len(m) <= 2000 for m in messages)
    assert all(m.count("```") % 2 == 0 for m in messages)  # no message starts or ends inside the code block
    assert all(m.endswith((".", "```")) for m in messages)  # cut after a sentence or a block
    assert code.strip() in "\n\n".join(messages)


# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, data, content_type, expected",
    [
        ("cut.jpg", truncated_jpeg(), "image/jpeg", "cut.jpg is cut off: the JPEG file is incomplete."),
        ("big.png", png((6000, 5000)), "image/png", "big.png is 6000x5000 pixels (30.0 megapixels); the limit is 25 megapixels."),
        ("report.pdf", b"%PDF-1.4 a report", "application/pdf", "report.pdf isn't an image, so I left it out."),
    ],
)
async def test_bad_files_get_a_clear_answer_and_the_bot_keeps_answering(fake, start_bot, tap, name, data, content_type, expected):
    await start_bot()
    ann = fake.user("Ann")
    thread = await thread_of(fake, await fake.say(ann, fake.text_channel, "what is this?", mention=True, attachments=(fake.upload(name, data, content_type),)))
    answer = await fake.wait_for(lambda: next((m["content"] for m in fake.bot_messages(thread["id"]) if expected in m["content"]), None))
    assert f"*{expected}" in answer  # a note, in italics
    if name == "report.pdf":
        assert len(tap.prompts) == 1 and "<image>" not in tap.prompt()  # answered without the PDF
    else:
        assert tap.prompts == []  # the asker meant to show an image: no answer without it
    after = tap.force_next("a red square")
    await fake.say(ann, thread, "and this one?", attachments=(fake.upload("ok.png", image_bytes(), "image/png"),))
    await bot_says(fake, thread, after)


async def test_a_file_larger_than_it_claims_is_read_only_up_to_the_limit(fake, start_bot, tap, config):
    """An attachment that says it has 1 KB while the CDN sends 150 MiB: the download stops at the limit."""
    images = config.images.model_copy(update={"max_bytes": 1024 * 1024, "allowed_hosts": ["127.0.0.1"]})
    await start_bot({"images": images})
    ann = fake.user("Ann")
    liar = fake.upload("small.png", image_bytes()[:1024], "image/png", served_bytes=150 * 1024 * 1024)
    thread = await thread_of(fake, await fake.say(ann, fake.text_channel, "what is this?", mention=True, attachments=(liar,)))
    expected = "I won't fetch small.png: it is larger than the 1.0 MB limit."
    await fake.wait_for(lambda: any(expected in m["content"] for m in fake.bot_messages(thread["id"])))
    assert fake.cdn_sent[liar["id"]] < 16 * 1024 * 1024  # what loopback's socket buffers hold, at most
    assert tap.prompts == []
    after = tap.force_next("a red square")
    await fake.say(ann, thread, "and this one?", attachments=(fake.upload("ok.png", image_bytes(), "image/png"),))
    await bot_says(fake, thread, after)


# -- while the model works ---------------------------------------------------------------------


async def test_a_waiting_request_shows_its_place_and_deleting_the_question_cancels_it(fake, start_bot, tap):
    await start_bot()
    ann, bob = fake.user("Ann"), fake.user("Bob")
    tap.gate.clear()  # the model is busy with Ann's question until released
    anns_thread = await thread_of(fake, await fake.say(ann, fake.text_channel, "first", mention=True))
    await tap.wait_held()
    question = await fake.say(bob, fake.text_channel, "second", mention=True)
    bobs_thread = await thread_of(fake, question)
    status = await bot_says(fake, bobs_thread, "⏳ Waiting for the model: you're #1 in line.")

    await fake.delete(question)
    await fake.wait_for(lambda: status["id"] not in fake.messages)  # the status goes with the question
    tap.gate.set()
    await fake.wait_for(lambda: fake.bot_texts(anns_thread["id"]) and not fake.bot_texts(anns_thread["id"])[0].startswith("⏳"))
    later = tap.force_next("still here")
    await bot_says(fake, await thread_of(fake, await fake.say(bob, fake.text_channel, "third", mention=True)), later)
    assert len(tap.prompts) == 2 and all("second" not in tap.prompt(i) for i in range(2))  # Bob's deleted question never reached the model
    assert fake.bot_texts(bobs_thread["id"]) == []


# -- slash commands and the message command ------------------------------------------------------


def deferred(interaction) -> bool:
    """Whether the command's one interaction response was a deferral (type 5: "thinking...")."""
    return [response["type"] for response in interaction.responses] == [5]


def ephemeral_note(interaction) -> str:
    """The text of the command's one interaction response, which must be a message only its user sees."""
    [response] = interaction.responses
    assert response["type"] == 4 and response["data"]["flags"] == 64
    return response["data"]["content"]


@pytest.mark.parametrize(
    "command, options, prompt_part, said, shown",
    [
        ("ask", {"question": "What colour is it?"}, "User: What colour is it?", "a red square", None),
        ("caption", {}, "", "a red square", None),
        # The model made to say "dog": that label has all the probability.
        ("classify", {"labels": "cat, dog, bird"}, "from the following list: ['cat', 'dog', 'bird']", "dog", "dog (100%), then cat (<1%)"),
        ("story", {}, "Use the image to write a story.", "a red square", None),
    ],
)
async def test_slash_commands_defer_then_answer(fake, start_bot, tap, command, options, prompt_part, said, shown):
    await start_bot()
    ann = fake.user("Ann")
    image = fake.upload("red.png", image_bytes(), "image/png")
    spelled = tap.force_next(said)
    answer = shown or spelled
    interaction = await fake.run_command(ann, fake.text_channel, command, {**options, "image": image["id"]}, attachments={image["id"]: image})
    await command_answer(fake, interaction, answer)
    assert deferred(interaction)
    assert prompt_part in tap.prompt() and tap.prompt().count("<image>") == 1
    assert all(pings_no_one(call) for call in fake.writes())


async def test_ask_takes_an_image_link_and_story_and_ask_fall_back_to_the_last_image(fake, start_bot, tap):
    await start_bot()
    ann = fake.user("Ann")
    image = fake.upload("linked.png", image_bytes((0, 255, 0)), "image/png")
    answer = tap.force_next("a green square")
    asked = await fake.run_command(ann, fake.text_channel, "ask", {"question": "What is it?", "link": image["url"]})
    await command_answer(fake, asked, answer)
    assert tap.prompt().count("<image>") == 1
    story = tap.force_next("once upon a time")
    told = await fake.run_command(ann, fake.text_channel, "story")
    await command_answer(fake, told, f"{story}\n\n*I used the last image I saw in this channel (linked.png).*")
    again = tap.force_next("still green")
    asked_again = await fake.run_command(ann, fake.text_channel, "ask", {"question": "And now?"})
    await command_answer(fake, asked_again, f"{again}\n\n*I used the last image I saw in this channel (linked.png).*")
    assert "User: And now?" in tap.prompt() and tap.prompt().count("<image>") == 1  # the instruct format, as on Slack


async def test_without_guild_ids_commands_are_global_and_work_in_dms(fake, start_bot, tap):
    await start_bot(command_guild_ids=[])
    assert {command["name"] for command in fake.commands["global"]} == {"ask", "caption", "classify", "story", "reset", "forget", "Describe image"}
    assert fake.guild_id not in fake.commands
    ann = fake.user("Ann")
    image = fake.upload("red.png", image_bytes(), "image/png")
    answer = tap.force_next("a red square")
    asked = await fake.run_command(ann, fake.dm_channel(ann), "ask", {"question": "What is it?", "image": image["id"]}, attachments={image["id"]: image})
    await command_answer(fake, asked, answer)
    assert deferred(asked) and "User: What is it?" in tap.prompt()


async def test_the_message_command_describes_a_messages_image(fake, start_bot, tap):
    await start_bot()
    ann, bob = fake.user("Ann"), fake.user("Bob")
    posted = await fake.say(ann, fake.other_channel, "my holiday", attachments=(fake.upload("beach.png", image_bytes(), "image/png"),))
    answer = tap.force_next("a sandy beach")
    interaction = await fake.run_command(bob, fake.other_channel, "Describe image", target=posted)
    await command_answer(fake, interaction, answer)
    assert deferred(interaction) and "Describe this image in detail." in tap.prompt() and tap.prompt().count("<image>") == 1
    plain = await fake.say(ann, fake.other_channel, "no picture here")
    nothing = await fake.run_command(bob, fake.other_channel, "Describe image", target=plain)
    await fake.wait_for(lambda: nothing.responses)
    assert ephemeral_note(nothing) == "*That message has no image attached.*" and len(tap.prompts) == 1


async def test_reset_forgets_the_threads_conversation_or_the_channels(fake, start_bot, tap):
    await start_bot()
    ann = fake.user("Ann")
    first = tap.force_next("the first answer")
    thread = await thread_of(fake, await fake.say(ann, fake.text_channel, "remember the word banana", mention=True))
    await bot_says(fake, thread, first)
    reset = await fake.run_command(ann, thread, "reset")
    await command_answer(fake, reset, "Forgot this conversation (2 messages); the next message starts afresh.")
    assert deferred(reset)
    second = tap.force_next("a new start")
    await fake.say(ann, thread, "what was the word?")  # still the bot's thread: no mention needed
    await bot_says(fake, thread, second)
    assert "banana" not in tap.prompt()
    # In the channel (as a Slack slash command always is): every conversation of the channel.
    in_channel = await fake.run_command(ann, fake.text_channel, "reset")
    await command_answer(fake, in_channel, "Forgot 1 conversation here (2 messages); the next message starts afresh.")
    again = await fake.run_command(ann, fake.text_channel, "reset")
    await command_answer(fake, again, "There was nothing to forget here.")


async def test_forget_deletes_a_persons_messages_and_images_everywhere(fake, start_bot, tap):
    await start_bot()
    ann, bob = fake.user("Ann"), fake.user("Bob")
    first = tap.force_next("a red square")
    photo = fake.upload("red.png", image_bytes(), "image/png")
    thread = await thread_of(fake, await fake.say(ann, fake.text_channel, "what is this?", mention=True, attachments=(photo,)))
    await bot_says(fake, thread, first)
    second = tap.force_next("hello Bob")
    bobs = await thread_of(fake, await fake.say(bob, fake.text_channel, "remember the word banana", mention=True))
    await bot_says(fake, bobs, second)
    forget = await fake.run_command(ann, fake.text_channel, "forget")
    await command_answer(fake, forget, "Done: I forgot you everywhere: 2 messages (yours and my answers to them) and 1 image only you sent.")
    third = tap.force_next("what image?")
    await fake.say(ann, thread, "what did I show you?")  # still the bot's thread, but it remembers nothing of Ann
    await bot_says(fake, thread, third)
    assert "<image>" not in tap.prompt() and "what is this?" not in tap.prompt()
    fourth = tap.force_next("banana")
    await fake.say(bob, bobs, "which word?")
    await bot_says(fake, bobs, fourth)
    assert "remember the word banana" in tap.prompt()  # Bob's conversation is untouched
    again = await fake.run_command(bob, fake.text_channel, "forget")
    await command_answer(fake, again, "Done: I forgot you everywhere: 4 messages (yours and my answers to them).")


async def test_a_command_slower_than_discord_allows_gets_a_clear_message(fake, start_bot, tap):
    await start_bot()
    tap.gate.clear()  # a model that doesn't answer in time
    image = fake.upload("red.png", image_bytes(), "image/png")
    # Created 14 min 49 s ago: a second is left of the 15 minutes (less the adapter's safety margin).
    interaction = await fake.run_command(
        fake.user("Ann"), fake.text_channel, "caption", {"image": image["id"]}, attachments={image["id"]: image}, created_at=time.time() - 889
    )
    await command_answer(fake, interaction, "longer than Discord lets me answer a command", exactly=False)
    assert deferred(interaction)
    tap.gate.set()
    again = await fake.run_command(fake.user("Bob"), fake.text_channel, "caption", {"image": image["id"]}, attachments={image["id"]: image})
    await fake.wait_for(lambda: again.original)  # and the next command is answered


# -- who may use the bot -----------------------------------------------------------------------


async def test_blocked_users_and_channels_get_a_short_note_and_no_model_call(fake, start_bot, tap):
    ann, bob = fake.user("Ann"), fake.user("Bob")
    await start_bot(blocked_users=[ann["id"]], blocked_channels=[fake.other_channel["id"]], refusal_notice=True)
    await fake.say(ann, fake.text_channel, "hello", mention=True)
    await bot_says(fake, fake.text_channel, "Sorry, I'm not available to you here.")
    await fake.say(bob, fake.other_channel, "hello", mention=True)
    await bot_says(fake, fake.other_channel, "I don't answer in this channel.")
    refused = await fake.run_command(ann, fake.text_channel, "story")
    await fake.wait_for(lambda: refused.responses)
    assert ephemeral_note(refused) == "Sorry, I'm not available to you here."
    assert tap.prompts == [] and fake.threads() == []
    answer = tap.force_next("hello bob")
    await bot_says(fake, await thread_of(fake, await fake.say(bob, fake.text_channel, "hello", mention=True)), answer)


async def test_refusals_are_silent_by_default_and_other_bots_are_ignored(fake, start_bot, tap, caplog):
    caplog.set_level(logging.INFO, logger="adapters.discord")
    ann, robot = fake.user("Ann"), fake.user("Robot", bot=True)
    role_member = fake.user("Carl")
    await start_bot(blocked_users=[ann["id"]], blocked_roles=[fake.role["id"]])
    await fake.say(ann, fake.text_channel, "hello", mention=True)
    await fake.say(robot, fake.text_channel, "hello", mention=True)
    await fake.say(role_member, fake.text_channel, "hello", mention=True, roles=(fake.role["id"],))
    answer = tap.force_next("hello bob")
    await bot_says(fake, await thread_of(fake, await fake.say(fake.user("Bob"), fake.text_channel, "hello", mention=True)), answer)
    await fake.wait_for(lambda: len([r for r in caplog.records if r.getMessage() == "discord.refused"]) == 2)
    assert len(tap.prompts) == 1 and len(fake.threads()) == 1
    assert fake.bot_messages(fake.text_channel["id"]) == []


# -- connection ----------------------------------------------------------------------------------


async def test_a_gateway_reconnect_mid_conversation_loses_nothing(fake, start_bot, tap):
    await start_bot()
    ann = fake.user("Ann")
    tap.gate.clear()
    first = tap.force_next("the first answer")
    thread = await thread_of(fake, await fake.say(ann, fake.text_channel, "remember the word banana", mention=True))
    await tap.wait_held()
    await fake.reconnect()  # while the answer is being written
    second = tap.force_next("the second answer")
    await fake.say(ann, thread, "what was the word?")  # sent while the bot reconnects: replayed on RESUME
    tap.gate.set()
    await fake.wait_for(lambda: fake.sessions[-1:] == ["resume"])
    await bot_says(fake, thread, first)
    await bot_says(fake, thread, second)
    assert "remember the word banana" in tap.prompt() and f"Assistant: {first}" in tap.prompt()
    assert fake.sessions == ["identify", "resume"]


async def test_a_gateway_payload_that_makes_discord_py_raise_ends_in_a_reconnect(fake, start_bot, tap, caplog):
    await start_bot(reconnect_backoff_s=0.05)
    ann = fake.user("Ann")
    await fake.send_unparseable()  # discord.py's gateway task raises TypeError and ends
    await fake.wait_for(lambda: fake.sessions == ["identify", "identify"])
    answer = tap.force_next("still listening")
    thread = await thread_of(fake, await fake.say(ann, fake.text_channel, "are you there?", mention=True))
    await bot_says(fake, thread, answer)
    said = [(r.getMessage(), r.levelname) for r in caplog.records if r.name == "adapters.discord"]
    assert ("discord.disconnected", "ERROR") in said and ("discord.reconnecting", "WARNING") in said
    (failure,) = [r for r in caplog.records if r.getMessage() == "discord.disconnected"]
    assert failure.exc_info is not None and failure.reason == "TypeError"  # the traceback, once
    caplog.clear()  # the errors above are this test's subject


async def test_a_gateway_that_keeps_failing_makes_run_exit_with_an_error_and_healthz_say_so(fake, config, tap, caplog):
    health = config.health.model_copy(update={"enabled": True, "port": free_port()})
    settings = discord_config(config, fake, reconnect_attempts=1, reconnect_backoff_s=2.0).model_copy(update={"health": health})
    bot = await RunningBot(settings, fake).start()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{health.port}/healthz") as response:
            assert response.status == 200
        fake.unparseable_on_identify = True
        with logged("adapters.discord") as logs:
            await fake.send_unparseable()
            await logs.wait_for(lambda records: any(r.msg == "discord.reconnecting" for r in records))
        async with http.get(f"http://127.0.0.1:{health.port}/healthz") as response:  # in the pause before reconnecting
            assert response.status == 503 and (await response.json())["adapters"] == {"discord": False}
        with pytest.raises(
            CommandError,
            match=r"The discord connection was lost and couldn't be restored \(the gateway connection failed 2 times in a row; the last error was TypeError\)",
        ):
            await asyncio.wait_for(bot.task, 60)
    assert fake.sessions == ["identify", "identify"]
    assert any(r.getMessage() == "discord.gave_up" for r in caplog.records)
    caplog.clear()


@pytest.mark.parametrize(
    "failure, logged_as",
    [
        (
            RestFailure(
                "PUT",
                "/applications/*/commands",
                400,
                body={
                    "message": "Invalid Form Body",
                    "code": 50035,
                    "errors": {"0": {"name": {"_errors": [{"code": "APPLICATION_COMMAND_INVALID_NAME", "message": "Command name is invalid"}]}}},
                },
            ),
            ("WARNING", "In 0.name: Command name is invalid"),
        ),
        (RestFailure("PUT", "/applications/*/commands", 403, code=50001, message="Missing Access"), ("WARNING", "Missing Access")),
        (RestFailure("PUT", "/applications/*/commands", 200, body={"not": "a list of commands"}), ("ERROR", "")),
    ],
    ids=["field errors", "missing access", "an answer discord.py can't read"],
)
async def test_commands_that_cant_be_registered_are_logged_with_discords_words_and_the_bot_starts(fake, start_bot, tap, caplog, failure, logged_as):
    fake.rest_failures.append(failure)
    await start_bot(command_guild_ids=[])
    (record,) = [r for r in caplog.records if r.getMessage() == "discord.commands_not_registered"]
    level, words = logged_as
    assert record.levelname == level and words in record.error
    if failure.status == 403:
        assert record.code == 50001 and "applications.commands" in record.hint
    answer = tap.force_next("still here")
    thread = await thread_of(fake, await fake.say(fake.user("Ann"), fake.text_channel, "hello?", mention=True))
    await bot_says(fake, thread, answer)  # the bot chats all the same
    caplog.clear()  # the logged error is this test's subject


async def test_a_restarted_bot_continues_the_threads_conversation(fake, start_bot, tap):
    first_run = await start_bot()
    ann = fake.user("Ann")
    first = tap.force_next("the first answer")
    thread = await thread_of(fake, await fake.say(ann, fake.text_channel, "remember the word banana", mention=True))
    await bot_says(fake, thread, first)
    await first_run.stop()
    assert discord.http.Route.BASE == "https://discord.com/api/v10"  # the test addresses don't outlive the bot

    await start_bot()
    second = tap.force_next("the second answer")
    await fake.say(ann, thread, "what was the word?")
    await bot_says(fake, thread, second)
    assert "remember the word banana" in tap.prompt() and f"Assistant: {first}" in tap.prompt()


async def test_startup_problems_are_reported_with_what_to_do(config, tap):
    async with FakeDiscord(message_content_enabled=False) as fake:
        with pytest.raises(ConfigError, match="Privileged Gateway Intents → MESSAGE CONTENT INTENT"):
            await RunningBot(discord_config(config, fake), fake).start()
        wrong = discord_config(config, fake, token="not-the-token")
        with pytest.raises(ConfigError, match=r"Discord refused the token. Copy your bot's token from https://discord.com/developers/applications"):
            await RunningBot(wrong, fake).start()
        assert fake.unknown == []
    assert discord.http.Route.BASE == "https://discord.com/api/v10"
    assert str(discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY) == "wss://gateway.discord.gg/"


@pytest.mark.parametrize(
    "section, message",
    [
        ("enabled = true", r"\[discord\] is enabled but has no token: set token in this section, or DISCORD_TOKEN"),
        ('token = "t"\ncommand_guild_ids = ["my server"]', "command_guild_ids holds server ids, numbers written as strings"),
        ('token = "t"\ngateway_url = "http://127.0.0.1:3001/gateway"', "gateway_url must be a ws:// or wss:// address"),
    ],
)
def test_configuration_mistakes_are_reported_plainly(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        write_config(tmp_path / "config.toml", f"[discord]\n{section}\n")


def test_thread_names_come_from_the_question_and_fit_discord():
    assert thread_name("  What is\nin this   image? ") == "What is in this image?"
    long = thread_name("why " * 60)
    assert len(long) == 100 and long.endswith("…")
    assert thread_name("", [Attachment("cat.png", read=None)]) == "About cat.png"
    assert thread_name("") == "A question for IDEFICS"
