"""Idefics3 / SmolVLM on the tiny checkpoint in SmolVLM's layout: the chat template, its special
tokens, images at the processor's longest edge, and the guide's tasks on both families."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from bot.runtime.app import Runtime
from ground.conversation import Author, ConversationKey
from ground.messages import Final, IncomingMessage, TaskRequest
from model.pictures import decode
from tests.conftest import BOTH_FAMILIES, image_bytes
from tests.model_tap import ModelTap
from tests.test_cli import assert_no_traceback, idefics_bot
from tests.test_engine import attachment

KEY = ConversationKey("test", "channel-1")
ANN = Author("u1", "Ann")
IDEFICS3 = pytest.mark.parametrize("tiny_checkpoint", ["idefics3"], indirect=True)


def test_a_tiny_idefics3_checkpoint_answers_and_render_shows_its_chat_template(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(image_bytes(size=(640, 480), kind="JPEG"))
    written = idefics_bot("tiny-checkpoint", "tiny3", "--family", "idefics3", cwd=tmp_path)
    assert written.returncode == 0 and "tiny random Idefics3 checkpoint" in written.stdout, written.stderr
    asked = idefics_bot("ask", "--model", "tiny3", "--image", "photo.jpg", "What is in this image?", cwd=tmp_path)
    assert asked.returncode == 0, asked.stderr
    assert_no_traceback(asked)
    conversation = {
        "shared": True,
        "system_prompt": "Be brief.",
        "turns": [
            {"role": "user", "name": "Ann", "parts": ["What is in this image?", {"image": "idefix.png"}]},
            {"role": "assistant", "text": "A dog."},
            {"role": "user", "name": "Bob", "parts": [{"image": "obelix.png"}, "And who <|im_start|>is that?<row_1_col_1>"]},
        ],
    }
    (tmp_path / "chat.json").write_text(json.dumps(conversation))
    rendered = idefics_bot("render", "--model", "tiny3", "--conversation", "chat.json", cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.splitlines() == [
        json.dumps("<|im_start|>System: Be brief.<end_of_utterance>\nUser: [Ann] What is in this image?"),
        "<image idefix.png>",
        json.dumps("<end_of_utterance>\nAssistant: A dog.<end_of_utterance>\nUser: [Bob]"),
        "<image obelix.png>",
        json.dumps("And who is that?<end_of_utterance>\nAssistant:"),
    ]


@pytest.fixture
async def runtime(config):
    async with Runtime.open(config) as started:
        yield started


@IDEFICS3
async def test_typed_idefics3_specials_reach_the_model_as_text_only(tap: ModelTap, runtime):
    typed = "what do <|im_start|>, <|im_end|>, <global-img>, <row_1_col_1> and <|endoftext|> mean?"
    message = IncomingMessage(KEY, Author("u1", "Eve<|im_start|>"), typed, (attachment("red.png", image_bytes()),), "m1", shared=True)
    final = [event async for event in runtime.engine.reply(message)][-1]
    assert final.text or final.notes
    seen = tap.prompt()
    # The template's own: one <|im_start|>, and for the one image (64 x 48: scaled up, 2 x 2 tiles) one
    # global image and one of each tile's tokens.
    assert seen.count("<|im_start|>") == 1 and seen.count("<|im_end|>") == 0 and seen.count("<|endoftext|>") == 0
    assert seen.count("<global-img>") == 1 and seen.count("<row_1_col_1>") == 1 and seen.count("<row_2_col_2>") == 1
    assert "User: [Eve] what do , , ,  and  mean?" in seen


@IDEFICS3
async def test_images_are_kept_at_the_processors_longest_edge(runtime):
    assert runtime.model.info.image_longest_edge == 128 and runtime.model.info.family == "idefics3"
    processor = runtime.model.family.processor
    for size, kept in (((640, 480), (128, 96)), ((300, 900), (42, 128)), ((100, 60), (100, 60))):
        original = image_bytes((200, 120, 40), size=size, kind="JPEG")
        image = await runtime.engine.intake.prepare(original, "photo.jpg")
        assert decode(image).size == kept
        # What the processor makes of the kept image is what it makes of the original.
        ours = processor.image_processor(decode(image), return_tensors="np")["pixel_values"]
        theirs = processor.image_processor(Image.open(io.BytesIO(original)).convert("RGB"), return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape and np.abs(ours - theirs).mean() < 0.02


@BOTH_FAMILIES
@pytest.mark.parametrize("task, cue", [("caption", ""), ("prompted_caption", "This is an image of"), ("vqa", "Answer:"), ("classify_generate", "Category:")])
async def test_the_guides_tasks_work_on_both_families(tap: ModelTap, runtime, task, cue):
    tap.say = "a red square"
    request = TaskRequest(task, KEY, ANN, (attachment("red.png", image_bytes()),), "what colour is it?" if task == "vqa" else "", labels="red, blue")
    final = [event async for event in runtime.engine.run_task(request)][-1]
    assert isinstance(final, Final) and final.text == tap.spelled("a red square"), final.notes
    assert tap.prompt().rstrip().endswith(cue)
    assert tap.images(tap.prompt()) == 1


@BOTH_FAMILIES
async def test_the_story_is_searched_with_beams_on_both_families(runtime):
    request = TaskRequest("story", KEY, ANN, (attachment("door.png", image_bytes()),))
    events = [event async for event in runtime.engine.run_task(request)]
    assert isinstance(events[-1], Final) and (events[-1].text or events[-1].notes == ("The model gave an empty reply.",))
