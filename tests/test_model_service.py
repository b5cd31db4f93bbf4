"""The local model service on the tiny checkpoint: stopping, batching, streaming, cancellation, limits."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import pytest
import torch
from transformers import LogitsProcessor

from ground.images import ModelImage
from model.idefics_v1 import processor_items
from model.loading import CheckpointSettings
from model.local import BatchSettings, LocalBackend
from model.pictures import decode
from model.service import Chat, Finished, GenerationFailed, GenerationParams, GenerationRequest, Message, ModelBusy, ModelTimeout, Queued, Started, TextDelta
from tests.conftest import BOTH_FAMILIES, guided, image_bytes


def model_image(color, size=(64, 48)) -> ModelImage:
    data = image_bytes(color, size)
    return ModelImage(hashlib.sha256(data).hexdigest(), data, f"{color}.png")


RED, BLUE = model_image((220, 20, 20)), model_image((20, 20, 220), (40, 80))
PROMPTS = {
    "no image": Chat((Message("user", ("Tell me a story about a dog.",)),)),
    "one image": Chat((Message("user", ("What is in this image?", RED)),)),
    "two images": Chat((Message("user", (RED, BLUE, "And who is that?")),)),
}
# What IDEFICS v1 receives for each.
V1_ITEMS = {
    "no image": ["User: Tell me a story about a dog.<end_of_utterance>", "\nAssistant:"],
    "one image": ["User: What is in this image?", RED, "<end_of_utterance>", "\nAssistant:"],
    "two images": ["User:", RED, BLUE, "And who is that?<end_of_utterance>", "\nAssistant:"],
}


class Script:
    """Decides tokens at given steps of every reply, and can forbid the end tokens so that a reply runs
    exactly as long as a test needs. A row processor factory: records how many steps each reply ran."""

    def __init__(self, forced: dict[int, int] | None = None, ban: tuple[int, ...] = ()):
        self.forced = forced or {}
        self.ban = ban
        self.steps: list[int] = []

    def __call__(self, prompt_ids: list[int]) -> LogitsProcessor:
        self.steps.append(0)
        return _ScriptedRow(self, len(self.steps) - 1)


class _ScriptedRow(LogitsProcessor):
    def __init__(self, script: Script, number: int):
        self.script, self.number = script, number

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        script = self.script
        step = script.steps[self.number]
        script.steps[self.number] += 1
        if script.ban:
            scores[:, list(script.ban)] = -float("inf")
        if step in script.forced:
            scores[:, :] = -float("inf")
            scores[:, script.forced[step]] = 0.0
        return scores


async def scripted_backend(checkpoint, script: Script, **batching) -> LocalBackend:
    service = await LocalBackend.open(CheckpointSettings(str(checkpoint)), BatchSettings(**batching), row_processors=[script])
    return service


def request(prompt, max_new_tokens=16, **kwargs) -> GenerationRequest:
    """A request for `prompt`: a Chat, or a list of v1 items sent verbatim."""
    chat = prompt if isinstance(prompt, Chat) else guided(prompt)
    return GenerationRequest(prompt=chat, params=GenerationParams(max_new_tokens=max_new_tokens), **kwargs)


async def drain(stream) -> None:
    async for _ in stream:
        pass


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


def test_v1_receives_the_instruct_format(backend):
    for name, chat in PROMPTS.items():
        assert backend.render(chat) == V1_ITEMS[name], name


@BOTH_FAMILIES
async def test_batched_greedy_replies_equal_replies_run_alone(backend):
    alone = {name: (await collect(backend, request(prompt, max_new_tokens=24)))[1] for name, prompt in PROMPTS.items()}
    sizes_before = len(backend.batch_sizes)
    together = await asyncio.gather(*(collect(backend, request(prompt, max_new_tokens=24)) for prompt in PROMPTS.values()))
    # All three ran together (a reply whose first token ends it leaves at once).
    assert backend.batch_sizes[sizes_before:][-1] == sum(finished.tokens > 0 for _, finished in together)
    for (name, single), (_, batched) in zip(alone.items(), together):
        assert batched == single, name
    # The images matter: the same question about the images in the other order gets another reply.
    other = (await collect(backend, request(Chat((Message("user", (BLUE, RED, "And who is that?")),)), 24)))[1]
    assert other.text != alone["two images"].text


@BOTH_FAMILIES
async def test_each_row_streams_its_own_text(backend):
    backend.row_processors.append(Script(ban=tuple(backend.family.end_ids)))  # every reply runs its 30 tokens
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
        # The slow one runs before the other arrives (its image is processed first, in the prompt process).
        slow_stream = service.stream(request(PROMPTS["one image"], 1500, timeout=0.3))
        while not isinstance(await anext(slow_stream), Started):
            pass
        slow = asyncio.create_task(drain(slow_stream))
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
    for _events, finished in results[:-1]:
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
    items = [decode(item) if isinstance(item, ModelImage) else item for item in prompt]
    expected = processor(text=[items], return_tensors="pt", add_end_of_utterance_token=False)["input_ids"].shape[1]
    assert await backend.count_tokens(guided(prompt)) == expected


@pytest.mark.parametrize("sizes", [[], [(64, 48)], [(64, 48), (40, 80)], [(500, 20), (20, 20), (300, 300)]])
@BOTH_FAMILIES
async def test_token_counts_match_the_processor_on_both_families(backend, sizes):
    images = [model_image((10 * n, 0, 0), size) for n, size in enumerate(sizes)]
    chat = Chat((Message("system", ("System.",)), Message("user", ("look", *images, "here")), Message("assistant", ("Fine.",)), Message("user", ("and?",))))
    family = backend.family
    assert await backend.count_tokens(chat) == len(family.model_inputs([chat])["input_ids"][0])


async def test_text_that_looks_like_a_url_is_never_fetched(backend):
    # The processor would download this item; a refused connection would fail the request.
    link = "http://127.0.0.1:9/cat.png"
    prompt = ["User:", RED, f"{link}<end_of_utterance>", "\nAssistant:"]
    _, finished = await collect(backend, request(prompt, 8))
    assert finished.tokens > 0
    items = processor_items(prompt)
    assert all(isinstance(item, str) and len(item) == 1 for item in items[2:-1])
    assert "".join(items[2:-1]) == f"{link}<end_of_utterance>"


class Hang(LogitsProcessor):
    """Blocks the first reply at its third step, as a wedged GPU kernel would (a row processor factory)."""

    def __init__(self):
        import threading

        self.release = threading.Event()
        self.rows = 0

    def __call__(self, prompt_ids: list[int]) -> LogitsProcessor:
        self.rows += 1
        return _HangingRow(self.release) if self.rows == 1 else _HangingRow(None)


class _HangingRow(LogitsProcessor):
    def __init__(self, release):
        self.release, self.step = release, 0

    def __call__(self, input_ids, scores):
        self.step += 1
        if self.release is not None and self.step == 3:
            self.release.wait(timeout=60)
        return scores


async def test_a_stuck_worker_is_replaced_and_its_requests_answered(tiny_checkpoint):
    hang = Hang()
    # Long enough that a healthy step on a busy machine never looks stuck, short enough for a test.
    service = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint)), BatchSettings(stall_timeout_s=3), row_processors=[hang])
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
    service = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint)), BatchSettings(stall_timeout_s=3, max_batch_size=1), row_processors=[hang])
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


# -- the running batch: joining, leaving, queueing, failing ------------------------------------


def no_end(tokenizer) -> Script:
    return Script(ban=(tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id))


async def solo_replies(service, requests) -> list[Finished]:
    """Each request run alone, one after another."""
    return [(await collect(service, req))[1] for req in requests]


MIXED = [request(PROMPTS["two images"], 9), request(PROMPTS["no image"], 3), request(PROMPTS["one image"], 14), request(PROMPTS["no image"], 6)]


async def test_requests_joining_a_running_batch_mid_flight_get_their_solo_replies(tiny_checkpoint, tokenizer):
    service = await scripted_backend(tiny_checkpoint, no_end(tokenizer))
    try:
        long_request = request(PROMPTS["one image"], 40)
        expected = await solo_replies(service, [long_request, *MIXED])
        sizes = len(service.batch_sizes)
        running = service.stream(long_request)
        events = []
        async for event in running:  # the long reply is under way
            events.append(event)
            if isinstance(event, TextDelta):
                break
        joined = await asyncio.gather(*(collect(service, req) for req in MIXED))
        events += [event async for event in running]
    finally:
        await service.close()
    assert events[-1] == expected[0]
    assert [finished for _, finished in joined] == expected[1:]
    assert max(service.batch_sizes[sizes:]) > 2 and service.batch_sizes[sizes] == 1  # they joined the running batch


async def test_a_full_batch_queues_the_rest_and_rows_leaving_make_room(tiny_checkpoint, tokenizer):
    service = await scripted_backend(tiny_checkpoint, no_end(tokenizer), max_batch_size=2)
    try:
        requests = [*MIXED, request(PROMPTS["two images"], 5)]
        expected = await solo_replies(service, requests)
        results = await asyncio.gather(*(collect(service, req) for req in requests))
    finally:
        await service.close()
    assert [finished for _, finished in results] == expected
    assert max(service.batch_sizes) == 2
    waited = [[event.position for event in events if isinstance(event, Queued)] for events, _ in results]
    assert any(max(positions) >= 2 for positions in waited)  # somebody waited behind others, and was told
    assert all(positions[-1] == 1 or len(positions) == 1 for positions in waited)  # and moved up


async def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_are_unchanged(tiny_checkpoint, tokenizer):
    import threading

    script = no_end(tokenizer)
    reached, go = threading.Event(), threading.Event()

    def pause_the_second_row_at_step_3(prompt_ids):
        processor = script(prompt_ids)
        if len(script.steps) != 2:
            return processor

        class Paused(LogitsProcessor):
            def __call__(self, input_ids, scores):
                if script.steps[1] == 3:
                    reached.set()
                    go.wait(30)
                return processor(input_ids, scores)

        return Paused()

    service = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint)), BatchSettings(), row_processors=[pause_the_second_row_at_step_3])
    try:
        first, victim, third = request(PROMPTS["one image"], 20), request(PROMPTS["no image"], 200), request(PROMPTS["two images"], 20)
        streams = [service.stream(req) for req in (first, victim, third)]
        for stream in streams:  # queued in this order
            await anext(stream)
        tasks = [asyncio.create_task(collect_rest(stream)) for stream in (streams[0], streams[2])]
        victim_stream = streams[1]
        victim_task = asyncio.create_task(collect_rest(victim_stream))
        assert await asyncio.to_thread(reached.wait, 30)  # the worker is in step 3 of the victim
        victim_task.cancel()  # the asker goes away...
        with contextlib.suppress(asyncio.CancelledError):
            await victim_task  # ...and its request is cancelled before the worker goes on
        go.set()
        results = await asyncio.gather(*tasks)
        steps_of_victim = script.steps[1]
        expected = await solo_replies(service, [first, third])
    finally:
        go.set()
        await service.close()
    assert steps_of_victim == 4  # steps 0-3, then it left: never stepped again
    assert results == expected


async def collect_rest(stream) -> Finished:
    events = [event async for event in stream]
    return events[-1]


class Faulty:
    """The real model, failing a forward whose input holds the token `poison` (as a bad kernel would for
    one request), running out of memory for a forward of more than `max_rows` rows, and for the
    next `oom_prefills` prefills."""

    def __init__(self, model):
        self.inner = model
        self.poison: int | None = None
        self.max_rows: int | None = None
        self.oom_prefills = 0
        self.failures: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **inputs):
        ids = inputs["input_ids"]
        if self.max_rows is not None and ids.shape[0] > self.max_rows:
            self.failures.append(f"oom {ids.shape[0]}")
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB for a batch of {ids.shape[0]}")
        if self.oom_prefills and ids.shape[1] > 1:
            self.oom_prefills -= 1
            self.failures.append("oom prefill")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison is not None and (ids == self.poison).any():
            self.failures.append("prefill" if ids.shape[1] > 1 else "decode")
            raise RuntimeError("CUDA error: device-side assert triggered")
        return self.inner(**inputs)


@pytest.fixture
def faulty_models(monkeypatch):
    import model.local

    made: list[Faulty] = []
    load = model.local.load_checkpoint

    def load_faulty(settings):
        loaded, processor = load(settings)
        made.append(Faulty(loaded))
        return made[-1], processor

    monkeypatch.setattr(model.local, "load_checkpoint", load_faulty)
    return made


async def test_a_row_whose_forward_fails_fails_alone(tiny_checkpoint, tokenizer, faulty_models):
    tilde = tokenizer.convert_tokens_to_ids("<0x7E>")
    script = no_end(tokenizer)

    def says_tilde_when_asked(prompt_ids):
        # A reply that comes to the poisoned token at its third step: its decoding step fails.
        wants = "tilde" in tokenizer.decode(prompt_ids)
        return Script(forced={2: tilde}, ban=script.ban)(prompt_ids) if wants else script(prompt_ids)

    service = await LocalBackend.open(CheckpointSettings(str(tiny_checkpoint)), BatchSettings(), row_processors=[says_tilde_when_asked])
    faulty_models[0].poison = tilde
    try:
        good = MIXED
        expected = await solo_replies(service, good)
        bad_prompt = request(["User: what is ~ here?<end_of_utterance>", "\nAssistant:"], 8)  # fails in its prefill
        bad_reply = request(["User: say tilde<end_of_utterance>", "\nAssistant:"], 8)  # fails at its third step
        results = await asyncio.gather(*(collect(service, req) for req in [good[0], bad_prompt, *good[1:3], bad_reply, good[3]]), return_exceptions=True)
    finally:
        await service.close()
    failures = faulty_models[0].failures
    assert "prefill" in failures and "decode" in failures
    assert isinstance(results[1], GenerationFailed) and isinstance(results[4], GenerationFailed)
    assert "could not answer" in str(results[4])
    assert [finished for _, finished in (results[0], *results[2:4], results[5])] == expected


async def test_out_of_memory_lowers_the_token_budget_and_every_request_is_answered(tiny_checkpoint, tokenizer, faulty_models, caplog):
    service = await scripted_backend(tiny_checkpoint, no_end(tokenizer))
    try:
        requests = [*MIXED, request(PROMPTS["one image"], 30), request(PROMPTS["two images"], 12)]
        expected = await solo_replies(service, requests)
        faulty_models[0].max_rows = 2
        with caplog.at_level("WARNING", logger="model.local"):
            results = await asyncio.gather(*(collect(service, req) for req in requests))
        budget = service._token_budget
    finally:
        await service.close()
    assert any(failure.startswith("oom") for failure in faulty_models[0].failures)
    assert budget < BatchSettings().max_batch_tokens
    assert [record.tokens for record in caplog.records if record.msg == "batch.budget_lowered"]
    assert [finished for _, finished in results] == expected  # rows put back in the queue went on where they were


async def test_a_prefill_out_of_memory_waits_for_room_while_the_others_decode(tiny_checkpoint, tokenizer, faulty_models, caplog):
    service = await scripted_backend(tiny_checkpoint, no_end(tokenizer), max_batch_size=2)
    try:
        running, newcomer, behind = request(PROMPTS["one image"], 80), request(PROMPTS["no image"], 16), request(PROMPTS["two images"], 60)
        expected = await solo_replies(service, [running, newcomer, behind])
        stream = service.stream(running)
        events = [event async for event in _until_text(stream)]
        faulty_models[0].oom_prefills = 1  # the next prefill (the newcomer's) runs out of memory
        with caplog.at_level("WARNING", logger="model.local"):
            others = asyncio.gather(collect(service, newcomer), collect(service, behind))
            events += [event async for event in stream]
            (_, newcomer_finished), (behind_events, behind_finished) = await others
    finally:
        await service.close()
    assert faulty_models[0].failures == ["oom prefill"]
    assert [record.msg for record in caplog.records if record.levelname == "WARNING"] == ["batch.budget_lowered"]
    assert events[-1] == expected[0]  # the running reply went on, untouched
    assert [newcomer_finished, behind_finished] == expected[1:]  # the newcomer waited, then was answered
    positions = [event.position for event in behind_events if isinstance(event, Queued)]
    assert positions[-2:] == [2, 1]  # the newcomer, put back in front, counted in the place shown


async def test_a_beam_search_runs_in_the_batch_beside_others_and_gives_generates_tokens(tiny_checkpoint, tokenizer):
    ends = [tokenizer.convert_tokens_to_ids("<end_of_utterance>"), tokenizer.eos_token_id]
    service = await scripted_backend(tiny_checkpoint, no_end(tokenizer))
    try:
        guide = guided(["Instruction: Use the image to write a story. \n", RED, "Story: \n"])
        story = GenerationRequest(guide, GenerationParams(max_new_tokens=30, num_beams=2))

        def searched(model, processor) -> list[int]:
            inputs = service.family.model_inputs([story.prompt])
            output = model.generate(
                **inputs,
                num_beams=2,
                max_new_tokens=30,
                eos_token_id=ends,
                bad_words_ids=[[token] for token in service.family.banned_ids],
                logits_processor=[Script(ban=tuple(ends))([])],
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            return output[0, inputs["input_ids"].shape[1] :].tolist()

        expected = await service.call_between_steps(searched)
        long_request = request(PROMPTS["one image"], 60)
        running = service.stream(long_request)
        events = [event async for event in _until_text(running)]
        story_events, story_finished = await collect(service, story)
        events += [event async for event in running]
        sizes = service.batch_sizes
    finally:
        await service.close()
    assert story_finished == Finished(text=service._decode(expected), reason="length", tokens=30)
    assert sum(isinstance(event, TextDelta) for event in story_events) == 1  # whole, at the end
    assert isinstance(events[-1], Finished) and events[-1].tokens == 60
    assert max(sizes) == 3  # the long reply's row and the story's two beams, decoding together


async def _until_text(stream):
    async for event in stream:
        yield event
        if isinstance(event, TextDelta):
            return


async def test_work_between_steps_runs_on_the_worker_and_the_batch_goes_on(tiny_checkpoint, tokenizer):
    """A one-off forward (as label scoring does) slots in between two steps of the running batch."""
    import threading

    service = await scripted_backend(tiny_checkpoint, no_end(tokenizer))
    try:
        expected = await solo_replies(service, MIXED)
        first = service.stream(MIXED[0])
        while not isinstance(await anext(first), Started):  # the batch is running
            pass
        replies = asyncio.gather(collect_rest(first), *(collect(service, req) for req in MIXED[1:]))

        def score(model, processor):
            ids = processor.tokenizer("a dog", return_tensors="pt").input_ids
            logits = model(input_ids=ids, image_attention_mask=torch.zeros(1, ids.shape[1], 1), perceiver_embeddings=torch.zeros(1, 4, 64)).logits
            return threading.current_thread().name, logits.shape[:2] == ids.shape

        thread, scored = await service.call_between_steps(score)
        results = await replies
    finally:
        await service.close()
    assert thread.startswith("idefics-generate") and scored
    assert [results[0], *(finished for _, finished in results[1:])] == expected


async def test_text_waits_for_the_stream_interval_and_nothing_is_lost(tiny_checkpoint, tokenizer):
    """The worker hands text to the event loop at most every `stream_interval_s` (each hand-over costs
    it the GIL): with an interval longer than the reply, the text arrives with the end, and it is the
    reply's whole text, as with every token sent at once."""
    script = no_end(tokenizer)
    service = await scripted_backend(tiny_checkpoint, script, stream_interval_s=3600)
    steps_seen = []
    try:
        events = []
        async for event in service.stream(request(PROMPTS["no image"], 12)):
            if isinstance(event, TextDelta) and not steps_seen:
                steps_seen.append(script.steps[-1])  # how far the reply had got when its first text arrived
            events.append(event)
    finally:
        await service.close()
    every_token = await scripted_backend(tiny_checkpoint, no_end(tokenizer), stream_interval_s=0)
    try:
        expected = (await collect(every_token, request(PROMPTS["no image"], 12)))[1]
    finally:
        await every_token.close()
    assert steps_seen == [12]  # the whole reply had been decoded: its text was held until the end
    assert events[-1] == expected and "".join(event.text for event in events if isinstance(event, TextDelta)) == expected.text
