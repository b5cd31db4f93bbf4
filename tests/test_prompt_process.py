"""The prompt process: prompts and scorings processed beside the running batch are exactly what the
worker would make of them, answers stay those of a request alone, a process that dies is replaced
without losing a request, and an image it took as cached but that left the cache since is processed
again on the worker."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest
import torch

from model.family import ProcessedPrompt
from model.image_cache import ImageCache
from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from model.scoring import process_scoring
from model.service import Chat, GenerationParams, GenerationRequest, Message, ScoreRequest, Started, StreamEvent
from tests.conftest import BOTH_FAMILIES
from tests.test_batch import NoEnd
from tests.test_image_cache import GREEN, asking
from tests.test_model_service import BLUE, RED

LABELS = ("a cat", "a dog", "a red square")


@pytest.fixture
async def service(tiny_checkpoint):
    """A backend whose replies never end early (so a long one runs while others come and go), and
    without an image cache: a prompt asked again has its images processed again."""
    backend = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint), dtype="float32"), BatchSettings(image_cache_bytes=0))
    no_end = NoEnd(sorted(backend.family.end_ids))
    backend.row_processors.append(lambda prompt_ids: no_end)
    yield backend
    await backend.close()


def request(chat, tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(chat, GenerationParams(max_new_tokens=tokens))


async def running(service: LocalBackend) -> AsyncIterator[StreamEvent]:
    """A long reply, started: while it decodes, newcomers are processed in the prompt process."""
    stream = service.stream(request(asking(), 4000))
    while not isinstance(await anext(stream), Started):
        pass
    return stream


def assert_same(apart: ProcessedPrompt, here: ProcessedPrompt) -> None:
    assert (apart.ids, apart.images, apart.new) == (here.ids, here.images, here.new)
    assert torch.equal(apart.image_mask, here.image_mask)
    assert apart.pixels.keys() == here.pixels.keys()
    for name, tensor in here.pixels.items():
        assert apart.pixels[name].dtype == tensor.dtype and torch.equal(apart.pixels[name], tensor)


@BOTH_FAMILIES
async def test_the_prompt_process_makes_what_the_worker_makes(service):
    family = service.family
    family.image_cache = ImageCache(2**30)
    await service.call_between_steps(lambda model, _: family.prepare(model, asking(RED)))  # RED is cached now
    chat = asking(RED, BLUE, RED)
    cached = family.cached_images(chat)
    assert cached == {RED.digest}
    prompt_process = service.prompt_process
    assert prompt_process is not None and await prompt_process.ready()

    apart = await prompt_process.process(chat, cached)
    assert apart is not None and apart.new == (BLUE.digest,)
    assert_same(apart, family.process(chat, cached))

    scoring = await prompt_process.process_scoring(chat, LABELS, cached)
    assert scoring is not None
    here = process_scoring(family, chat, LABELS, cached)
    assert (scoring.rows, scoring.starts) == (here.rows, here.starts)
    assert_same(scoring.prompt, here.prompt)


@BOTH_FAMILIES
async def test_newcomers_beside_a_running_reply_are_processed_apart_and_answered_as_alone(service):
    question, scoring = request(asking(BLUE, RED)), ScoreRequest(asking(RED), LABELS)
    alone = (await service.generate(question)).text, await service.score(scoring)
    assert service.prompt_process is not None and service.prompt_process.processed == 0  # alone: on the worker

    long = await running(service)
    beside = (await service.generate(question)).text, await service.score(scoring)
    await long.aclose()
    assert service.prompt_process.processed == 2
    assert beside[0] == alone[0]
    assert beside[1] == pytest.approx(alone[1], abs=1e-4)


async def test_a_killed_prompt_process_is_replaced_and_loses_nothing(service):
    prompt_process = service.prompt_process
    assert prompt_process is not None
    question = request(asking(BLUE))
    alone = (await service.generate(question)).text
    long = await running(service)
    killed = prompt_process.pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)

    assert (await service.generate(question)).text == alone  # processed on the worker instead
    assert await prompt_process.ready()
    assert prompt_process.pid not in (None, killed)
    assert (await service.generate(question)).text == alone
    await long.aclose()
    assert prompt_process.processed == 1  # the last one, in the new process


async def test_an_image_that_left_the_cache_after_processing_is_processed_again(service):
    family, prompt_process = service.family, service.prompt_process
    assert prompt_process is not None
    blue, both = request(asking(BLUE)), request(asking(RED, GREEN))
    family.image_cache = ImageCache(2**30)
    alone = [(await service.generate(question)).text for question in (blue, both)]
    states = [family.image_cache.get(image.digest) for image in (RED, GREEN, BLUE)]
    assert all(image is not None and image.shape == states[0].shape for image in states)  # IDEFICS v1: one size
    # A cache of one image, RED's. The question about RED and GREEN goes to the prompt process, with
    # RED as cached; BLUE's, sent while the process is busy, is processed on the worker and encoded
    # first, evicting RED: RED must be processed again.
    family.image_cache = ImageCache(family.image_cache.used_bytes // 3)
    await service.call_between_steps(lambda model, _: family.prepare(model, asking(RED)))
    assert family.image_cache.digests() == [RED.digest]
    long = await running(service)
    answers = await asyncio.gather(service.generate(both), service.generate(blue))
    await long.aclose()
    assert prompt_process.processed == 1
    assert [answer.text for answer in answers] == alone[::-1]
    assert family.image_cache.digests() == [GREEN.digest]


@BOTH_FAMILIES
@pytest.mark.parametrize(
    "chat",
    [
        asking(RED),
        Chat((Message("user", ("Instruction: classify", RED, "Category:")),), guide=("Instruction: classify", RED, "Category:")),
        Chat((Message("user", ("hi",)), Message("assistant", ("hello, what can I do?",)), Message("user", ("what is", BLUE, "?")))),
    ],
    ids=["question", "guide", "history"],
)
def test_continuations_are_tokenized_from_their_last_shared_added_token_as_whole(service, chat):
    family = service.family
    labels = ["cat", " dog", "dog house", "a red square, 2 of them", "!"]
    continued = [chat.continued(label) for label in labels]
    assert family.continuation_ids(chat, labels) == family.token_ids(continued)
    # What it relies on, so that it takes the short way: the tokenizer starts afresh at an added token.
    texts = [family.processed_text(chat) for chat in continued]
    shared = os.path.commonprefix(texts)  # noqa: RUF071 (characters)
    cut = max(shared.rfind(token) for token in family.special_tokens)
    assert cut > 0
    head = family.tokenizer(shared[:cut], add_special_tokens=False).input_ids
    assert all(head + family.tokenizer(text[cut:], add_special_tokens=False).input_ids == whole for text, whole in zip(texts, family.token_ids(continued)))
