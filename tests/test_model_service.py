"""The local model service on the tiny checkpoint: stopping, batching, streaming, cancellation, limits."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from transformers import LogitsProcessor

from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from model.service import (
    Finished,
    GenerationFailed,
    GenerationParams,
    GenerationRequest,
    ModelBusy,
    ModelImage,
    ModelTimeout,
    Queued,
    Started,
    TextDelta,
)
from tests.conftest import image_bytes


def model_image(color, size=(64, 48)) -> ModelImage:
    data = image_bytes(color, size)
    return ModelImage(hashlib.sha256(data).hexdigest(), data, f"{color}.png")


RED, BLUE = model_image((220, 20, 20)), model_image((20, 20, 220), (40, 80))
PROMPTS = {
    "no image": ["User: Tell me a story about a dog.<end_of_utterance>", "\nAssistant:"],
    "one image": ["User: What is in this image?", RED, "<end_of_utterance>", "\nAssistant:"],
    "two images": ["User:", RED, BLUE, "And who is that?<end_of_utterance>", "\nAssistant:"],
}


class Script(LogitsProcessor):
    """Decides tokens at given steps of every generate call, and can forbid the end tokens so that
    a reply runs exactly as long as a test needs. Records how many steps each call ran."""

    def __init__(self, forced: dict[int, int] | None = None, ban: tuple[int, ...] = ()):
        self.forced = forced or {}
        self.ban = ban
        self.steps: list[int] = []
        self._last_length = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        length = input_ids.shape[1]
        if self._last_length is None or length != self._last_length + 1:
            self.steps.append(0)
        self._last_length = length
        step = self.steps[-1]
        self.steps[-1] += 1
        if self.ban:
            scores[:, list(self.ban)] = -float("inf")
        if step in self.forced:
            scores[:, :] = -float("inf")
            scores[:, self.forced[step]] = 0.0
        return scores


async def scripted_backend(checkpoint, script: Script, **batching) -> LocalBackend:
    service = LocalBackend(CheckpointSettings(str(checkpoint)), BatchSettings(**batching), logits_processors=[script])
    await service.start()
    return service


def request(prompt, max_new_tokens=16, **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, params=GenerationParams(max_new_tokens=max_new_tokens), **kwargs)


async def collect(service, req) -> tuple[list, Finished]:
    events = [event async for event in service.stream(req)]
    return events, events[-1]


@pytest.fixture
def tokenizer(backend):
    return backend._tokenizer


async def test_stops_at_end_of_utterance(tiny_checkpoint, tokenizer):
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    script = Script(forced={5: eou})
    service = await scripted_backend(tiny_checkpoint, script)
    try:
        _, finished = await collect(service, request(PROMPTS["one image"], max_new_tokens=50))
    finally:
        await service.close()
    assert finished.reason == "stop"
    assert finished.tokens == 5
    assert script.steps == [6]  # generation ended right there


async def test_stops_at_user_turn_and_hides_a_trailing_user(tiny_checkpoint, tokenizer):
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    user_turn = tokenizer("\nUser:", add_special_tokens=False).input_ids
    texts = {}
    for name, forced in {
        "end": {4: eou},
        "user turn": {4 + i: token for i, token in enumerate(user_turn)},
        "trailing user": {**{4 + i: token for i, token in enumerate(user_turn[:-1])}, 4 + len(user_turn) - 1: eou},
    }.items():
        service = await scripted_backend(tiny_checkpoint, Script(forced=forced))
        try:
            _, finished = await collect(service, request(PROMPTS["no image"], max_new_tokens=40))
        finally:
            await service.close()
        assert finished.reason == "stop"
        texts[name] = finished.text
    assert "User" not in texts["user turn"] and "User" not in texts["trailing user"]
    assert texts["user turn"] == texts["trailing user"] == texts["end"]


async def test_batched_greedy_replies_equal_replies_run_alone(backend):
    alone = {name: (await collect(backend, request(prompt, max_new_tokens=24)))[1] for name, prompt in PROMPTS.items()}
    sizes_before = len(backend.batch_sizes)
    together = await asyncio.gather(*(collect(backend, request(prompt, max_new_tokens=24)) for prompt in PROMPTS.values()))
    assert backend.batch_sizes[sizes_before:] == [3]
    for (name, single), (_, batched) in zip(alone.items(), together):
        assert batched == single, name
    # The images matter: the same question about another image gets another reply.
    other = (await collect(backend, request(["User: What is in this image?", BLUE, "<end_of_utterance>", "\nAssistant:"], 24)))[1]
    assert other.text != alone["one image"].text


async def test_each_row_streams_its_own_text(backend):
    results = await asyncio.gather(*(collect(backend, request(prompt, max_new_tokens=30)) for prompt in PROMPTS.values()))
    for events, finished in results:
        kinds = [type(event) for event in events]
        assert kinds[0] is Queued and Started in kinds and kinds[-1] is Finished
        streamed = "".join(event.text for event in events if isinstance(event, TextDelta))
        assert streamed == finished.text
        assert sum(isinstance(event, TextDelta) for event in events) > 1


async def test_cancelling_frees_the_place_and_stops_the_row(tiny_checkpoint, tokenizer):
    ends = (tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id)
    script = Script(ban=ends)
    service = await scripted_backend(tiny_checkpoint, script, max_batch_size=1)
    try:
        long_reply = service.stream(request(PROMPTS["one image"], max_new_tokens=1500))
        async for event in long_reply:
            if isinstance(event, TextDelta):
                break  # the person deleted their message
        # Queued requests behind a cancelled one move up.
        second, third = service.stream(request(PROMPTS["no image"], 4)), service.stream(request(PROMPTS["no image"], 4))
        assert await anext(second) == Queued(1)
        assert await anext(third) == Queued(2)
        await second.aclose()
        assert await anext(third) == Queued(1)
        await long_reply.aclose()
        events = [event async for event in third]
        assert isinstance(events[-1], Finished) and events[-1].tokens == 4
    finally:
        await service.close()
    assert script.steps[0] < 1500  # the cancelled row stopped early instead of running to its limit


async def test_time_limits_end_with_clear_errors(tiny_checkpoint, tokenizer):
    ends = (tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id)
    service = await scripted_backend(tiny_checkpoint, Script(ban=ends), max_batch_size=1)
    try:
        slow = asyncio.create_task(collect(service, request(PROMPTS["one image"], 1500, timeout=0.3)))
        waiting = asyncio.create_task(collect(service, request(PROMPTS["no image"], 4, queue_timeout=0.2)))
        with pytest.raises(ModelTimeout, match=r"waited more than 0.2 s in the queue"):
            await waiting
        with pytest.raises(ModelTimeout, match=r"took longer than 0.3 s"):
            await slow
        # The service goes on serving.
        _, finished = await collect(service, request(PROMPTS["no image"], 4))
        assert finished.tokens == 4
    finally:
        await service.close()


async def test_one_failing_request_does_not_fail_its_batch(backend):
    broken = ModelImage("0" * 64, b"\x89PNG\r\n\x1a\nnot really", "broken.png")
    good = [collect(backend, request(prompt, 12)) for prompt in PROMPTS.values()]
    bad = collect(backend, request(["User:", broken, "What?<end_of_utterance>", "\nAssistant:"], 12))
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(results[-1], GenerationFailed)
    assert "could not answer" in str(results[-1])
    for events, finished in results[:-1]:
        assert isinstance(finished, Finished) and finished.tokens > 0


async def test_a_full_queue_says_busy(tiny_checkpoint, tokenizer):
    ends = (tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id)
    service = await scripted_backend(tiny_checkpoint, Script(ban=ends), max_batch_size=1, max_queue=2)
    try:
        running = service.stream(request(PROMPTS["no image"], 1500))
        while not isinstance(await anext(running), Started):
            pass
        queued = [service.stream(request(PROMPTS["no image"], 4)) for _ in range(2)]
        for stream in queued:
            await anext(stream)
        with pytest.raises(ModelBusy, match="busy"):
            await anext(service.stream(request(PROMPTS["no image"], 4)))
        for stream in (running, *queued):
            await stream.aclose()
    finally:
        await service.close()


async def test_token_count_matches_the_processor(backend):
    processor = backend._processor
    prompt = ["System.", "\nUser: look", RED, BLUE, "and", RED, "here<end_of_utterance>", "\nAssistant:"]
    items = [item.open() if isinstance(item, ModelImage) else item for item in prompt]
    expected = processor(text=[items], return_tensors="pt", add_end_of_utterance_token=False)["input_ids"].shape[1]
    assert await backend.count_tokens(prompt) == expected


async def test_text_that_looks_like_a_url_is_never_fetched(backend):
    # The processor would download this item; a refused connection would fail the request.
    link = "http://127.0.0.1:9/cat.png"
    prompt = ["User:", RED, f"{link}<end_of_utterance>", "\nAssistant:"]
    _, finished = await collect(backend, request(prompt, 8))
    assert finished.tokens > 0
    items = LocalBackend._processor_items(prompt)
    assert all(isinstance(item, str) and len(item) == 1 for item in items[2:-1])
    assert "".join(items[2:-1]) == f"{link}<end_of_utterance>"


class Hang(LogitsProcessor):
    """Blocks the first generate call at its third step, as a wedged GPU kernel would."""

    def __init__(self):
        import threading

        self.release = threading.Event()
        self.calls = 0
        self._last_length = None

    def __call__(self, input_ids, scores):
        length = input_ids.shape[1]
        if self._last_length is None or length != self._last_length + 1:
            self.calls += 1
            self._step = 0
        self._last_length = length
        self._step += 1
        if self.calls == 1 and self._step == 3:
            self.release.wait(timeout=60)
        return scores


async def test_a_stuck_worker_is_replaced_and_its_requests_answered(tiny_checkpoint):
    hang = Hang()
    # Long enough that a healthy step on a busy machine never looks stuck, short enough for a test.
    service = LocalBackend(CheckpointSettings(str(tiny_checkpoint)), BatchSettings(stall_timeout_s=3), logits_processors=[hang])
    await service.start()
    try:
        stuck = asyncio.create_task(collect(service, request(PROMPTS["one image"], 20)))
        with pytest.raises(GenerationFailed, match="stopped responding"):
            await stuck
        _, finished = await collect(service, request(PROMPTS["no image"], 5))
        assert finished.tokens == 5
    finally:
        hang.release.set()
        await service.close()


async def test_requests_waiting_behind_a_stuck_batch_are_answered_by_the_new_worker(tiny_checkpoint):
    hang = Hang()
    service = LocalBackend(CheckpointSettings(str(tiny_checkpoint)), BatchSettings(stall_timeout_s=3, max_batch_size=1), logits_processors=[hang])
    await service.start()
    try:
        stuck = service.stream(request(PROMPTS["one image"], 20))
        while not isinstance(await anext(stuck), Started):
            pass
        waiting = service.stream(request(PROMPTS["no image"], 5))
        assert await anext(waiting) == Queued(1)  # behind the batch that is about to hang
        with pytest.raises(GenerationFailed, match="stopped responding"):
            async for _ in stuck:
                pass
        events = [event async for event in waiting]
        assert isinstance(events[-1], Finished) and events[-1].tokens == 5
    finally:
        hang.release.set()
        await service.close()
