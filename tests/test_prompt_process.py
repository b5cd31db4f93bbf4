"""The prompt process: prompts and scorings processed beside the running batch are exactly what the
worker would make of them, answers stay those of a request alone, a process that dies is replaced
without losing a request, and an image it took as cached but that left the cache since is processed
again on the worker."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import threading
from collections.abc import AsyncIterator

import pytest
import torch

from model.family import ProcessedPrompt
from model.image_cache import ImageCache
from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from model.prompt_process import PromptProcess
from model.scoring import process_scoring
from model.service import Chat, GenerationParams, GenerationRequest, Message, ScoreRequest, Started, StreamEvent
from tests.conftest import BOTH_FAMILIES
from tests.test_batch import NoEnd
from tests.test_image_cache import GREEN, asking
from tests.test_model_service import BLUE, RED

LABELS = ("a cat", "a dog", "a red square")


CORES = len(os.sched_getaffinity(0))


@pytest.fixture
async def service(tiny_checkpoint, request):
    """A backend whose replies never end early (so a long one runs while others come and go), and
    without an image cache: a prompt asked again has its images processed again. Its torch threads
    are the test's parameter, if it has one: 1 leaves a core of this machine's 2 for the prompt
    process, which then encodes images too."""
    threads = torch.get_num_threads()
    settings = BatchSettings(image_cache_bytes=0, threads=getattr(request, "param", None))
    backend = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint), dtype="float32"), settings)
    no_end = NoEnd(sorted(backend.family.end_ids))
    backend.row_processors.append(lambda prompt_ids: no_end)
    yield backend
    await backend.close()
    torch.set_num_threads(threads)


# Each test marked so runs with the vision encoder on the worker (torch's threads on every core), and
# with the prompt process running it too (one torch thread for the worker, a core to spare).
WHERE_IMAGES_ARE_ENCODED = pytest.mark.parametrize("service", [None, 1], indirect=True, ids=["worker-encodes", "prompt-process-encodes"])


def encodes_apart(service: LocalBackend) -> bool:
    """Whether the prompt process encodes images too, as it should with a core to spare."""
    prompt_process = service.prompt_process
    assert prompt_process is not None
    assert prompt_process.encodes == (torch.get_num_threads() < CORES)
    return prompt_process.encodes


def request(chat, tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(chat, GenerationParams(max_new_tokens=tokens))


async def running(service: LocalBackend) -> AsyncIterator[StreamEvent]:
    """A long reply, started: while it decodes, newcomers are processed in the prompt process."""
    stream = service.stream(request(asking(), 4000))
    while not isinstance(await anext(stream), Started):
        pass
    return stream


async def assert_same(service: LocalBackend, apart: ProcessedPrompt, here: ProcessedPrompt) -> None:
    """`apart` from the prompt process is `here` from the worker: the same tokens and, for the new
    images, the same pixels or (if the process encodes) exactly the states the worker's encoder makes."""
    assert (apart.ids, apart.images, apart.new) == (here.ids, here.images, here.new)
    assert torch.equal(apart.image_mask, here.image_mask)
    if encodes_apart(service):
        family = service.family
        states = await service.call_between_steps(lambda model, _: family.encode_images(family.vision(model), here))
        assert apart.pixels == {} and len(apart.states) == len(states) == len(here.new)
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(apart.states, states))
        return
    assert apart.states == ()
    assert apart.pixels.keys() == here.pixels.keys()
    for name, tensor in here.pixels.items():
        assert apart.pixels[name].dtype == tensor.dtype and torch.equal(apart.pixels[name], tensor)


@BOTH_FAMILIES
@WHERE_IMAGES_ARE_ENCODED
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
    await assert_same(service, apart, family.process(chat, cached))

    scoring = await prompt_process.process_scoring(chat, LABELS, cached)
    assert scoring is not None
    here = process_scoring(family, chat, LABELS, cached)
    assert (scoring.rows, scoring.starts) == (here.rows, here.starts)
    await assert_same(service, scoring.prompt, here.prompt)


@BOTH_FAMILIES
@WHERE_IMAGES_ARE_ENCODED
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


@WHERE_IMAGES_ARE_ENCODED
async def test_a_killed_prompt_process_is_replaced_and_loses_nothing(service):
    prompt_process = service.prompt_process
    encodes = encodes_apart(service)
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
    assert prompt_process.encodes == encodes  # the new process has its copy of the vision part too
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


@BOTH_FAMILIES
async def test_the_vision_part_gives_the_models_own_image_states(service):
    """`Family.vision` (what the prompt process gets a copy of) is the model's own image path: IDEFICS
    v1's vision encoder and perceiver, Idefics3's `get_image_features`."""
    family = service.family
    processed = family.process(asking(RED, BLUE), frozenset())

    def both(model, _) -> tuple[torch.Tensor, torch.Tensor]:
        mine = torch.cat(family.encode_images(family.vision(model), processed))
        pixels = processed.pixels
        if family.name == "idefics3":
            return mine, torch.cat(list(model.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"]).pooler_output))
        return mine, model.model.perceiver_resampler(model.model.vision_model(pixel_values=pixels["pixel_values"]).last_hidden_state)

    mine, theirs = await service.call_between_steps(both)
    assert mine.shape[0] > 1 and torch.equal(mine, theirs)


def test_encoded_states_in_bfloat16_travel_as_float32_and_come_back_exactly():
    states = (torch.randn(2, 3).to(torch.bfloat16), torch.randn(1, 4).to(torch.bfloat16))
    prompt = ProcessedPrompt([1, 2], torch.zeros((2, 0), dtype=torch.bool), ("a", "b"), ("a", "b"), {}, states)
    arrived = pickle.loads(pickle.dumps(prompt))
    assert all(state.dtype == torch.float32 for state in arrived.states)
    assert all(torch.equal(back.to(torch.bfloat16), sent) for back, sent in zip(arrived.states, states))


async def test_a_vision_part_that_cannot_be_copied_leaves_the_encoding_to_the_worker(service, caplog):
    vision = await service.call_between_steps(lambda model, _: service.family.vision(model))
    vision.guard = threading.Lock()  # no pickle takes a lock
    prompt_process = await PromptProcess.open(service.family, vision, threads=1)
    try:
        assert prompt_process.pid is not None and not prompt_process.encodes
        assert "prompt_process.no_vision" in caplog.text
        processed = await prompt_process.process(asking(BLUE), frozenset())
        assert processed is not None and processed.states == () and processed.pixels
    finally:
        prompt_process.close()
