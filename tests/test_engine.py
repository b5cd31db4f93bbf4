"""The engine on the tiny model and a real SQLite store: turns in, replies out, nothing lost."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.prompt import chat_of
from bot.runtime.app import Runtime
from ground.conversation import Author, ConversationKey, ImageRef
from ground.messages import Attachment, Final, IncomingMessage, Partial, TaskRequest, Waiting
from tests.conftest import BOTH_FAMILIES, image_bytes
from tests.test_images import truncated_jpeg

KEY = ConversationKey("test", "channel-1", "thread-1")
ANN = Author("u1", "Ann")


def attachment(name: str, data: bytes, content_type: str | None = "image/png") -> Attachment:
    async def read(max_bytes: int) -> bytes:
        return data[: max_bytes + 1]

    return Attachment(name=name, read=read, size=len(data), content_type=content_type)


async def run(engine_call) -> tuple[list, Final]:
    events = [event async for event in engine_call]
    assert isinstance(events[-1], Final)
    return events, events[-1]


@pytest.fixture
async def runtime(config):
    async with Runtime.open(config) as started:
        yield started


@BOTH_FAMILIES
async def test_a_conversation_with_two_images_keeps_both_turns(runtime):
    engine = runtime.engine
    first = IncomingMessage(KEY, ANN, "What is in this image?", (attachment("red.png", image_bytes((255, 0, 0))),), "m1", shared=True)
    events, final = await run(engine.reply(first))
    assert final.text and not final.notes
    streamed = [event.text for event in events if isinstance(event, Partial)]
    assert streamed and final.text.startswith(streamed[-1])
    second = IncomingMessage(KEY, Author("u2", "Bob"), "And this one?", (attachment("blue.png", image_bytes((0, 0, 255))),), "m2", shared=True)
    _, final2 = await run(engine.reply(second))
    assert final2.text

    turns = await runtime.store.load_turns(KEY)
    assert [turn.role for turn in turns] == ["user", "assistant", "user", "assistant"]
    assert [turn.text for turn in turns[::2]] == ["What is in this image?", "And this one?"]
    assert turns[3].text == final2.text
    # What the model saw for the second reply: both turns, both images, each speaker named.
    items = runtime.engine.generation.model.render(chat_of(turns[:3], runtime.config.conversation.system_prompt, shared=True))
    images = [item for item in items if isinstance(item, ImageRef)]
    assert [image.name for image in images] == ["red.png", "blue.png"]
    texts = "".join(item for item in items if isinstance(item, str))
    assert "User: [Ann] What is in this image?" in texts and "User: [Bob] And this one?" in texts


async def test_a_restart_keeps_the_conversation(config):
    async with Runtime.open(config) as first:
        await run(first.engine.reply(IncomingMessage(KEY, ANN, "Remember me", (attachment("a.png", image_bytes()),))))
    async with Runtime.open(config) as second:
        turns = await second.store.load_turns(KEY)
        assert [turn.text for turn in turns][:1] == ["Remember me"] and len(turns) == 2
        _, final = await run(second.engine.reply(IncomingMessage(KEY, ANN, "Still there?")))
        assert final.text
        assert len(await second.store.load_turns(KEY)) == 4
        assert (await second.store.get_image(turns[0].images[0])).data.startswith(b"\x89PNG")


async def test_reset_forgets_only_that_conversation(runtime):
    other = ConversationKey("test", "channel-2")
    for key in (KEY, other):
        await run(runtime.engine.reply(IncomingMessage(key, ANN, "hello")))
    assert await runtime.engine.reset(KEY) == 2
    assert await runtime.store.load_turns(KEY) == []
    assert len(await runtime.store.load_turns(other)) == 2


@pytest.mark.parametrize(
    "text, files, note",
    [
        ("", (), "Send me a question, an image, or both"),
        ("   \n ", (), "Send me a question, an image, or both"),
        ("<image><end_of_utterance>", (), "Send me a question, an image, or both"),
        ("", (("report.pdf", b"%PDF-1.4 ...", "application/pdf"),), "report.pdf isn't an image, so I left it out"),
        ("look", (("cat.png", b"%PDF-1.4 ...", "image/png"),), "cat.png is a PDF document, not an image"),
        ("look", (("cut.jpg", truncated_jpeg(), "image/jpeg"),), "cut.jpg is cut off"),
        ("look", tuple((f"{n}.png", image_bytes(), "image/png") for n in range(5)), "That's 5 images; I can take 4 per message"),
        ("word " * 5000, (), "too long for me"),
    ],
)
async def test_bad_input_gets_a_clear_answer_and_nothing_is_stored(runtime, text, files, note):
    message = IncomingMessage(KEY, ANN, text, tuple(attachment(*file) for file in files))
    _events, final = await run(runtime.engine.reply(message))
    assert final.text == "" and any(note in n for n in final.notes), final.notes
    assert await runtime.store.load_turns(KEY) == []
    _, fine = await run(runtime.engine.reply(IncomingMessage(KEY, ANN, "and now a normal question")))
    assert fine.text


async def test_an_ignored_file_beside_a_question_is_mentioned(runtime):
    message = IncomingMessage(KEY, ANN, "What do you think?", (attachment("notes.txt", b"hello", "text/plain"),))
    _, final = await run(runtime.engine.reply(message))
    assert final.text and final.notes == ("notes.txt isn't an image, so I left it out. I can read PNG, JPEG, WebP, GIF, BMP, HEIC and AVIF.",)


async def test_cancelling_a_reply_takes_the_unanswered_turn_back(runtime):
    async def consume():
        async for event in runtime.engine.reply(IncomingMessage(KEY, ANN, "a question that gets deleted")):
            if isinstance(event, (Partial, Waiting)):
                started.set()

    started = asyncio.Event()
    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await runtime.store.load_turns(KEY) == []


async def test_messages_of_one_conversation_are_answered_in_order(runtime):
    texts = [f"message {n}" for n in range(4)]
    await asyncio.gather(*(run(runtime.engine.reply(IncomingMessage(KEY, ANN, text))) for text in texts))
    turns = await runtime.store.load_turns(KEY)
    assert [turn.role for turn in turns] == ["user", "assistant"] * 4
    assert [turn.text for turn in turns[::2]] == texts


async def test_history_drop_is_mentioned_once(config, tmp_path):
    small = config.model_copy(update={"conversation": config.conversation.model_copy(update={"max_images": 1})})
    async with Runtime.open(small) as runtime:
        notes = []
        for n in range(3):
            _, final = await run(runtime.engine.reply(IncomingMessage(KEY, ANN, f"picture {n}", (attachment(f"{n}.png", image_bytes((n * 90, 0, 0))),))))
            notes.append(final.notes)
    assert notes[0] == ()
    assert notes[1] == ("This conversation is now longer than I can read at once, so I no longer see its oldest messages.",)
    assert notes[2] == ()


@pytest.mark.parametrize(
    "task, question, labels",
    [("caption", "", ""), ("vqa", "What colour?", ""), ("classify", "", "cat, dog, bird"), ("story", "", ""), ("prompted_caption", "", "")],
)
async def test_tasks_answer_without_touching_the_conversation(runtime, task, question, labels):
    request = TaskRequest(task, KEY, ANN, (attachment("red.png", image_bytes()),), question, labels)
    _, final = await run(runtime.engine.run_task(request))
    assert final.text
    assert await runtime.store.load_turns(KEY) == []


async def test_tasks_fall_back_to_the_channels_last_image_and_say_so(runtime):
    request = TaskRequest("caption", KEY, ANN, last_image=True)
    _, refused = await run(runtime.engine.run_task(request))
    assert refused.notes == ("Give me an image (attach one or paste a link): I haven't seen one in this channel yet.",)
    await run(runtime.engine.reply(IncomingMessage(KEY, ANN, "see", (attachment("seen.png", image_bytes()),))))
    _, final = await run(runtime.engine.run_task(request))
    assert final.text and final.notes == ("I used the last image I saw in this channel (seen.png).",)


async def test_task_input_problems_are_explained(runtime):
    image = (attachment("red.png", image_bytes()),)
    for request, message in [
        (TaskRequest("classify", KEY, ANN, image, labels="cat"), "at least two labels"),
        (TaskRequest("vqa", KEY, ANN, image), "needs a question"),
        (TaskRequest("few_shot", KEY, ANN, image), "needs examples"),
        (TaskRequest("dance", KEY, ANN, image), "Unknown task 'dance'"),
    ]:
        _, final = await run(runtime.engine.run_task(request))
        assert final.text == "" and message in final.notes[-1]


async def test_shutdown_finishes_in_flight_and_refuses_new(runtime):
    reply = asyncio.create_task(run(runtime.engine.reply(IncomingMessage(KEY, ANN, "in flight"))))
    await asyncio.sleep(0)
    assert await runtime.engine.drain(30)
    _, final = await reply
    assert final.text
    _, late = await run(runtime.engine.reply(IncomingMessage(KEY, ANN, "too late")))
    assert late.notes == ("I'm shutting down for a moment; please send that again in a minute.",)


async def test_regenerating_replaces_the_answer_and_keeps_the_question_once(runtime):
    engine = runtime.engine
    question = IncomingMessage(KEY, ANN, "What is in this image?", (attachment("red.png", image_bytes((255, 0, 0))),), "m1")
    _, first = await run(engine.reply(question))
    assert first.turn_id is not None
    _, again = await run(engine.regenerate(KEY, first.turn_id, ANN, shared=False))
    assert again.text and again.turn_id not in (None, first.turn_id)
    turns = await runtime.store.load_turns(KEY)
    assert [(turn.role, turn.id) for turn in turns] == [("user", turns[0].id), ("assistant", again.turn_id)]
    assert turns[0].text == "What is in this image?"
