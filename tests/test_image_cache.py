"""The image cache: an image already seen is neither processed nor encoded again, replies stay those
of `generate` (fp32, greedy) whichever of a prompt's images were cached, and the byte budget keeps
the most recently used images."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ground.images import ModelImage
from model.batch import Batch, Row, Sampling
from model.families import family_for
from model.image_cache import ImageCache
from model.loading import CheckpointSettings, load_checkpoint
from model.local import BatchSettings, LocalBackend
from model.service import Chat, GenerationParams, GenerationRequest, Message
from tests.conftest import BOTH_FAMILIES
from tests.test_batch import NoEnd
from tests.test_model_service import BLUE, RED, model_image

GREEN, YELLOW = model_image((20, 200, 20)), model_image((220, 220, 20), (40, 80))
LENGTH = 12


@pytest.fixture(scope="module", params=["idefics", "idefics3", "idefics3-whole"])
def loaded(request, tiny_checkpoints):
    """The model (fp32), its family (without a cache), and a processor that lets no reply end early."""
    model, processor = load_checkpoint(CheckpointSettings(str(tiny_checkpoints(request.param)), dtype="float32"))
    family = family_for(processor, model.config)
    return model, family, NoEnd(sorted(family.end_ids))


@contextlib.contextmanager
def encoder_runs(model):
    """The list of the vision encoder's runs while the block runs: the images (or tiles) each took."""
    runs: list[int] = []
    hook = model.model.vision_model.register_forward_hook(lambda module, args, kwargs, output: runs.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        yield runs
    finally:
        hook.remove()


def cached_family(loaded, budget_bytes: int = 2**30):
    model, family, _ = loaded
    return family_for(family.processor, model.config, ImageCache(budget_bytes))


def asking(*images: ModelImage) -> Chat:
    return Chat((Message("system", ("Be brief.",)), Message("user", ("look at", *images, "what is there?"))))


def batched(loaded, family, chat: Chat) -> list[int]:
    """The greedy reply tokens of `chat` alone in a running batch, prepared by `family`."""
    model, _, no_end = loaded
    row = Row(0, family.prepare(model, chat), LENGTH, Sampling(), [no_end])
    batch = Batch.prefill(model, [row], family, family.tokenizer.pad_token_id)
    batch.choose(family.banned_ids)
    while row.generated < LENGTH:
        batch.decode(model)
        batch.choose(family.banned_ids)
    return row.ids[len(row.prompt.ids) :]


def generated(loaded, chat: Chat) -> list[int]:
    """The greedy reply tokens of `generate` on `chat`, pixels and all."""
    model, family, no_end = loaded
    inputs = family.model_inputs([chat])
    output = model.generate(
        **inputs,
        max_new_tokens=LENGTH,
        do_sample=False,
        bad_words_ids=[[token] for token in family.banned_ids],
        logits_processor=[no_end],
        pad_token_id=family.tokenizer.pad_token_id,
    )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize(
    "images",
    [
        pytest.param((RED, BLUE), id="cached, then new"),
        pytest.param((GREEN, RED), id="new, then cached"),
        pytest.param((YELLOW, RED, YELLOW), id="a new image twice"),
        pytest.param((RED, GREEN, RED), id="a cached image twice"),
    ],
)
def test_a_prompt_mixing_cached_and_new_images_gets_generates_tokens(loaded, images):
    model = loaded[0]
    family = cached_family(loaded)
    family.prepare(model, asking(RED))
    chat = asking(*images)
    new = list(dict.fromkeys(image for image in images if image != RED))
    assert family.process(chat, family.image_cache).new == tuple(image.digest for image in new)
    with encoder_runs(model) as runs:
        reply = batched(loaded, family, chat)
    assert len(runs) == 1  # the new images only, together
    assert reply == generated(loaded, chat)
    with encoder_runs(model) as runs:
        again = batched(loaded, family, chat)
    assert runs == [] and again == reply  # every image cached now


def test_the_budget_keeps_the_most_recently_used_images(loaded):
    model = loaded[0]
    red, green, blue = (model_image(color) for color in [(220, 20, 20), (20, 200, 20), (20, 20, 220)])  # one size: one cost each
    measuring = cached_family(loaded)
    measuring.prepare(model, asking(red))
    one_image = measuring.image_cache.used_bytes
    family = cached_family(loaded, budget_bytes=2 * one_image)

    def encoded(image: ModelImage) -> bool:
        with encoder_runs(model) as runs:
            family.prepare(model, asking(image))
        return bool(runs)

    assert [encoded(red), encoded(green), encoded(red)] == [True, True, False]
    assert encoded(blue)  # the budget holds two: green, the least recently used, goes
    assert [encoded(red), encoded(blue), encoded(green)] == [False, False, True]
    assert family.image_cache.used_bytes == 2 * one_image and red not in family.image_cache.digests()


def test_a_zero_budget_keeps_nothing(loaded):
    model = loaded[0]
    family = cached_family(loaded, budget_bytes=0)
    with encoder_runs(model) as runs:
        family.prepare(model, asking(RED))
        family.prepare(model, asking(RED))
    assert len(runs) == 2 and family.image_cache.used_bytes == 0


def test_the_cache_evicts_in_order_of_use_and_keeps_nothing_bigger_than_its_budget():
    cache = ImageCache(budget_bytes=3 * 16)
    for name in "abc":
        cache.put(name, torch.zeros(4))  # 16 bytes each
    assert cache.get("a") is not None
    cache.put("d", torch.zeros(4))
    assert cache.digests() == ["c", "a", "d"] and cache.used_bytes == 48
    cache.put("big", torch.zeros(13))
    assert "big" not in cache and cache.digests() == ["c", "a", "d"]
    cache.put("pair", torch.zeros(8))
    assert cache.digests() == ["d", "pair"] and cache.used_bytes == 48


@BOTH_FAMILIES
async def test_a_follow_up_about_the_same_photo_skips_the_vision_encoder(tiny_checkpoint):
    """Two turns of a conversation about one photo: the encoder runs for the first only, and the
    replies are those of a backend without the cache (whose encoder runs for both)."""
    first = Chat((Message("user", ("What is in this image?", RED)),))
    follow_up = Chat((*first.messages, Message("assistant", ("A red square.",)), Message("user", ("And its colour?",))))
    replies = {}
    for budget in (0, 256 * 2**20):
        service = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint), dtype="float32"), BatchSettings(image_cache_bytes=budget))
        try:
            with encoder_runs(service._model) as runs:
                replies[budget] = [(await service.generate(GenerationRequest(chat, GenerationParams(max_new_tokens=8)))).text for chat in (first, follow_up)]
        finally:
            await service.close()
        assert len(runs) == (2 if budget == 0 else 1)
    assert replies[0] == replies[256 * 2**20]
