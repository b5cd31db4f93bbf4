"""Splitting long replies and showing a streamed reply with throttled edits."""

from __future__ import annotations

import asyncio
import re

import pytest

from bot.sdk.delivery import WRITING, LiveReply, format_final, split_message, waiting_text
from ground.messages import Final, Partial, Waiting, Working

SENTENCE = "The quick brown fox jumps over the lazy dog. "


def words(text: str) -> list[str]:
    return re.sub(r"```\w*", " ", text).split()


def test_short_text_is_one_message():
    assert split_message("hello", 2000) == ["hello"]


def test_5000_characters_split_at_paragraphs_and_sentences():
    paragraphs = [(SENTENCE * 9).strip() for _ in range(13)]
    text = "\n\n".join(paragraphs)
    assert len(text) > 5000
    chunks = split_message(text, 2000)
    assert len(chunks) == 4  # four 405-character paragraphs fit in 2,000 characters, five don't
    assert all(len(chunk) <= 2000 for chunk in chunks)
    assert all(chunk.endswith(".") for chunk in chunks)  # whole paragraphs
    assert words(" ".join(chunks)) == words(text)


def test_a_long_paragraph_splits_after_a_sentence():
    chunks = split_message((SENTENCE * 60).strip(), 1000)
    assert all(len(chunk) <= 1000 and chunk.endswith("dog.") for chunk in chunks)


def test_code_blocks_are_not_cut_when_they_fit():
    code = "```python\n" + "\n".join(f"print({n})" for n in range(60)) + "\n```"
    text = SENTENCE * 30 + "\n\n" + code + "\n\n" + SENTENCE * 5
    chunks = split_message(text, 2000)
    assert len(chunks) == 2 and any(code in chunk for chunk in chunks)
    for chunk in chunks:
        assert chunk.count("```") % 2 == 0
    assert words(" ".join(chunks)) == words(text)


def test_a_code_block_longer_than_a_message_is_closed_and_reopened():
    code = "```js\n" + "\n".join(f"console.log({n});" for n in range(400)) + "\n```"
    chunks = split_message(code, 2000)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert len(chunk) <= 2000
        assert chunk.startswith("```js\n") and chunk.endswith("```")
    assert words(" ".join(chunks)).count("console.log(399);") == 1


def test_text_without_spaces_still_splits():
    chunks = split_message("x" * 4500, 2000)
    assert all(len(chunk) <= 2000 for chunk in chunks) and "".join(chunks) == "x" * 4500


class RecordingSurface:
    """A chat surface that keeps the messages as a platform would."""

    def __init__(self):
        self.messages: list[str] = []
        self.calls: list[tuple[str, int]] = []

    async def post(self, text):
        self.messages.append(text)
        self.calls.append(("post", len(self.messages) - 1))
        return len(self.messages) - 1

    async def edit(self, index, text):
        self.messages[index] = text
        self.calls.append(("edit", index))


async def events(*items, pause: float = 0.0):
    for item in items:
        if pause:
            await asyncio.sleep(pause)
        yield item


async def test_final_text_and_notes_end_up_in_the_messages():
    surface = RecordingSurface()
    final = Final("The answer.", ("Something to know.",))
    result = await LiveReply(surface, limit=2000, interval=0).run(events(Partial("The"), Partial("The answer."), final))
    assert result == final
    assert surface.messages == ["The answer.\n\n_Something to know._"]


async def test_edits_are_throttled():
    surface = RecordingSurface()
    stream = events(*(Partial("word " * n) for n in range(1, 60)), Final(("word " * 59).strip()), pause=0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await LiveReply(surface, limit=2000, interval=0.2).run(stream)
    elapsed = loop.time() - started
    # At most one edit per interval, plus the final one.
    assert 2 <= len(surface.calls) <= 2 + elapsed / 0.2
    assert surface.messages == [("word " * 59).strip()]


async def test_a_long_reply_continues_in_more_messages():
    surface = RecordingSurface()
    long_text = "\n\n".join((SENTENCE * 9).strip() for _ in range(12))
    await LiveReply(surface, limit=2000, interval=0).run(events(Partial(long_text[:1500]), Partial(long_text[:4000]), Final(long_text)))
    assert surface.messages == split_message(long_text, 2000)
    assert len(surface.messages) == 3


async def test_a_reply_continues_in_the_messages_posted_for_it_before_and_reports_new_ones():
    surface = RecordingSurface()
    surface.messages = ["Half an answ", "er that went on"]  # left by a process that died while writing it
    posted = []

    async def on_post(messages):
        posted.append(messages)

    reply = LiveReply(surface, limit=20, interval=0, messages=[0, 1], placeholder="Thinking…", on_post=on_post)
    await reply.run(events(Final("A whole answer, now in three messages.")))
    assert surface.messages == ["A whole answer,", "now in three", "messages."]
    assert surface.calls == [("edit", 0), ("edit", 0), ("edit", 1), ("post", 2)]  # the placeholder, then the answer
    assert posted == [[0, 1, 2]]


async def test_placeholder_then_queue_position_then_text():
    surface = RecordingSurface()
    reply = LiveReply(surface, limit=2000, interval=0, status_after=0, placeholder="Thinking…")
    await reply.run(events(Waiting(3), Waiting(1), Partial("Hi"), Final("Hi there"), pause=0.01))
    assert surface.calls[0] == ("post", 0)
    assert all(call == ("edit", 0) for call in surface.calls[1:])
    assert surface.messages == ["Hi there"]


async def test_the_queue_status_gives_way_when_the_model_starts():
    surface = RecordingSurface()
    shown = []
    original_edit = surface.edit

    async def recording_edit(index, text):
        shown.append(text)
        await original_edit(index, text)

    surface.edit = recording_edit
    reply = LiveReply(surface, limit=2000, interval=0, status_after=0)
    await reply.run(events(Waiting(1), Working(), Partial("Hi"), Final("Hi there"), pause=0.01))
    assert surface.messages[0] == "Hi there"
    assert shown[:1] == [WRITING] and waiting_text(1) not in shown  # the status was posted, then replaced


async def test_queue_position_shows_only_after_a_while():
    surface = RecordingSurface()
    reply = LiveReply(surface, limit=2000, interval=0, status_after=3600)
    await reply.run(events(Waiting(2), Partial("Hi"), Final("Hi")))
    assert waiting_text(2) not in surface.messages and surface.messages == ["Hi"]


async def test_cancelling_the_reply_closes_the_event_stream():
    closed = asyncio.Event()

    async def endless():
        try:
            n = 0
            while True:
                n += 1
                yield Partial("x" * n)
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    task = asyncio.create_task(LiveReply(RecordingSurface(), limit=2000, interval=0).run(endless()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


def test_format_final():
    assert format_final(Final("", ("Only a note.",)), lambda n: f"*{n}*") == "*Only a note.*"
