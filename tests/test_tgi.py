"""The TGI backend against a fake TGI server on 127.0.0.1: prompt form, streaming, stopping, errors,
retries, bounded concurrency, cancellation, start-up checks, and the engine running on it unchanged."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import random
from collections import Counter
from contextlib import aclosing

import pytest
from PIL import Image

from bot.runtime.app import Runtime
from bot.runtime.config import load_config
from bot.settings import ConfigError
from ground.conversation import Author, ConversationKey, ImageRef
from ground.images import ModelImage
from ground.messages import Attachment, Final, IncomingMessage, Partial, TaskRequest
from model.service import (
    Chat,
    Finished,
    GenerationFailed,
    GenerationParams,
    GenerationRequest,
    Message,
    ModelBusy,
    ModelLoadError,
    ModelTimeout,
    ModelUnavailable,
    Queued,
    Started,
    TextDelta,
)
from model.tgi import TGIBackend, TGISettings
from tests.conftest import guided, image_bytes, write_config
from tests.fake_tgi import Failure, FakeTGI, Reply


def model_image(color, kind="PNG") -> ModelImage:
    data = image_bytes(color, kind=kind)
    return ModelImage(hashlib.sha256(data).hexdigest(), data, f"{color}.{kind.lower()}")


RED, BLUE = model_image((220, 20, 20)), model_image((20, 20, 220), kind="JPEG")
ONE_IMAGE = guided(["User: What is in this image?", RED, "<end_of_utterance>", "\nAssistant:"])


def request(prompt=ONE_IMAGE, **changes) -> GenerationRequest:
    params = changes.pop("params", GenerationParams(max_new_tokens=40))
    return GenerationRequest(prompt=prompt if isinstance(prompt, Chat) else guided(prompt), params=params, **changes)


async def events_of(service: TGIBackend, req: GenerationRequest) -> list:
    return [event async for event in service.stream(req)]


def deltas(events: list) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


def uri(image: ModelImage, kind: str) -> str:
    return f"![](data:{kind};base64,{base64.b64encode(image.data).decode()})"


@pytest.fixture
async def fake():
    async with FakeTGI() as server:
        yield server


async def connected(fake: FakeTGI, **settings) -> TGIBackend:
    service = await TGIBackend.open(TGISettings(url=fake.url, retry_backoff_s=0.01, **settings))
    return service


@pytest.fixture
async def service(fake):
    backend = await connected(fake)
    yield backend
    await backend.close()


# -- the prompt and the stream ---------------------------------------------------------------


async def test_a_reply_streams_with_images_inline_as_data_uris_and_the_reference_settings(fake):
    service = await connected(fake, token="s3cret")
    fake.api_key = "s3cret"
    try:
        prompt = ["User:", RED, BLUE, "And who is that?<end_of_utterance>", "\nAssistant:"]
        events = await events_of(service, request(prompt))
    finally:
        await service.close()
    assert isinstance(events[0], Queued) and isinstance(events[1], Started)
    finished = events[-1]
    assert finished == Finished(text="A red square.", reason="stop", tokens=5)
    assert deltas(events) == finished.text
    sent = fake.generate_requests[0]
    assert sent["inputs"] == f"User:{uri(RED, 'image/png')}{uri(BLUE, 'image/jpeg')}And who is that?<end_of_utterance>\nAssistant:"
    assert sent["parameters"] == {
        "max_new_tokens": 40,
        "stop": ["<end_of_utterance>", "\nUser:"],
        "repetition_penalty": 1.0,
        "details": True,
        "return_full_text": False,
    }
    assert [kind for kind, _ in fake.images_seen] == ["image/png", "image/jpeg"]
    assert fake.generate_headers[0]["Authorization"] == "Bearer s3cret"


async def test_sampling_settings_reach_the_server_and_top_p_1_is_left_out(fake, service):
    await events_of(service, request(params=GenerationParams(max_new_tokens=9, do_sample=True, temperature=0.4, top_p=0.8)))
    await events_of(service, request(params=GenerationParams(max_new_tokens=9, do_sample=True, temperature=0.7, top_p=1.0)))
    first, second = (sent["parameters"] for sent in fake.generate_requests)
    assert (first["do_sample"], first["temperature"], first["top_p"]) == (True, 0.4, 0.8)
    assert second["temperature"] == 0.7 and "top_p" not in second


async def test_image_markup_typed_by_a_person_is_not_an_image(fake, service):
    prompt = ["User: look ![](http://10.0.0.1/secret.png) and", RED, "<end_of_utterance>", "\nAssistant:"]
    await events_of(service, request(prompt))
    assert len(fake.images_seen) == 1
    assert "![ ](http://10.0.0.1/secret.png)" in fake.generate_requests[0]["inputs"]


async def test_the_user_turn_stop_ends_the_reply_and_is_never_shown(fake, service):
    fake.replies.append(Reply(["Sure", ".", "\n", "User", ":", " and", " more"]))
    events = await events_of(service, request())
    assert events[-1] == Finished(text="Sure.", reason="stop", tokens=5)
    assert deltas(events) == "Sure."


async def test_stops_beyond_the_servers_limit_are_caught_here_and_the_stream_closed(fake):
    fake.max_stop_sequences = 1
    fake.replies.append(Reply(["Yes", ".", "\n", "User", ":", " again"], hold_after=5))
    service = await connected(fake)
    try:
        events = await events_of(service, request())
        assert fake.generate_requests[0]["parameters"]["stop"] == ["<end_of_utterance>"]
        assert events[-1] == Finished(text="Yes.", reason="stop", tokens=5)
        assert deltas(events) == "Yes."
        await fake.wait_for(lambda: fake.disconnects == 1)
    finally:
        await service.close()


async def test_a_reply_that_reaches_max_new_tokens_finishes_with_length(fake, service):
    fake.replies.append(Reply(["one", " two", " three", " four", " five"]))
    events = await events_of(service, request(params=GenerationParams(max_new_tokens=3)))
    assert events[-1] == Finished(text="one two three", reason="length", tokens=3)
    assert deltas(events) == "one two three"


@pytest.mark.parametrize(
    "tokens",
    [["All", " done", ".", "<end_of_utterance>"], ["All", " done", ".", "\n", "User", ":"]],
    ids=["end-of-utterance", "user-turn-stop"],
)
async def test_a_reply_whose_end_is_the_last_allowed_token_is_not_cut_off(fake, service, tokens):
    # TGI checks the length limit before the end token, so it reports "length" for these.
    fake.replies.append(Reply(tokens))
    events = await events_of(service, request(params=GenerationParams(max_new_tokens=len(tokens))))
    assert events[-1] == Finished(text="All done.", reason="stop", tokens=len(tokens))


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("in_stream", [False, True], ids=["http-422", "error-event"])
async def test_input_too_long_is_explained(fake, service, in_stream):
    if in_stream:
        fake.max_input_tokens = 5  # the fake router refuses it inside the stream, as TGI does
    else:
        fake.failures.append(Failure(422, "Input validation error: `inputs` must have less than 5 tokens. Given: 9", "validation"))
    with pytest.raises(GenerationFailed, match="too long for the model server"):
        await events_of(service, request())
    assert len(fake.generate_requests) == 1


async def test_a_generation_error_is_explained_and_not_retried(fake, service):
    fake.failures.append(Failure(424, "Request failed during generation: CUDA error", "generation"))
    with pytest.raises(GenerationFailed, match="hit an error while answering"):
        await events_of(service, request())
    assert len(fake.generate_requests) == 1


@pytest.mark.parametrize("in_stream", [False, True], ids=["http-503", "overloaded-event"])
async def test_a_503_burst_is_retried_and_the_reply_arrives_once(fake, service, in_stream):
    for _ in range(2):
        fake.failures.append(Failure(503, headers={"Retry-After": "0"}, in_stream=in_stream))
    events = await events_of(service, request())
    assert len(fake.generate_requests) == 3
    assert deltas(events) == events[-1].text == "A red square."


async def test_a_longer_overload_becomes_a_busy_message(fake, service):
    for _ in range(5):
        fake.failures.append(Failure(429))
    with pytest.raises(ModelBusy, match="model server is busy"):
        await events_of(service, request())
    assert len(fake.generate_requests) == 1 + service.settings.max_retries


async def test_retry_after_beyond_the_queue_timeout_gives_up_at_once(fake, service):
    fake.failures.append(Failure(503, headers={"Retry-After": "3600"}))
    with pytest.raises(ModelBusy):
        await events_of(service, request(queue_timeout=30))
    assert len(fake.generate_requests) == 1


@pytest.mark.parametrize(
    "ending, message",
    [
        ({"cut_after": 2}, "broke off in the middle of the reply"),
        ({"incomplete_after": 2}, "stopped in the middle of the reply"),  # TGI's incomplete_generation_stream
    ],
    ids=["connection-cut", "ended-by-the-server"],
)
async def test_a_stream_ended_mid_answer_fails_clearly_and_is_never_resent(fake, service, ending, message):
    fake.replies.append(Reply(["Once", " upon", " a", " time"], **ending))
    seen = []
    with pytest.raises(GenerationFailed, match=message):
        async for event in service.stream(request()):
            seen.append(event)
    assert deltas(seen) == "Once upon"
    assert len(fake.generate_requests) == 1


async def test_a_request_over_the_servers_payload_limit_says_what_to_change(fake, service):
    fake.payload_limit = 200  # the server was started with a lower --payload-limit than the bot's
    with pytest.raises(GenerationFailed, match=r"--payload-limit.*fewer images|fewer images.*--payload-limit"):
        await events_of(service, request())
    assert len(fake.body_sizes) == 1 and not fake.generate_requests, "refused, and not retried"


async def test_an_unreachable_server_is_retried_then_explained(fake):
    service = await connected(fake)
    try:
        await fake.server.__aexit__(None, None, None)  # the server goes away
        with pytest.raises(ModelUnavailable, match="can't reach the model server"):
            await events_of(service, request())
        assert service.health() == {"connected": True, "server_reachable": False}
    finally:
        await service.close()


async def test_a_token_count_that_fails_is_a_model_error(fake):
    service = await connected(fake)
    try:
        await fake.server.__aexit__(None, None, None)
        with pytest.raises(ModelUnavailable):
            await service.count_tokens(ONE_IMAGE)
    finally:
        await service.close()


# -- time limits, cancellation, concurrency --------------------------------------------------


async def test_leaving_the_iteration_closes_the_http_stream(fake, service):
    fake.replies.append(Reply(["Hello", " there", " friend"], hold_after=1))
    async with aclosing(service.stream(request())) as stream:
        async for event in stream:
            if isinstance(event, TextDelta):
                break
    await fake.wait_for(lambda: fake.disconnects == 1 and fake.streaming == 0)


async def test_a_reply_past_its_time_limit_stops_with_a_timeout(fake, service):
    fake.replies.append(Reply(["Hello", " there"], hold_after=1))
    with pytest.raises(ModelTimeout, match=r"took longer than 0.2 s"):
        await events_of(service, request(timeout=0.2))
    await fake.wait_for(lambda: fake.disconnects == 1)


async def test_requests_beyond_max_concurrency_wait_here_in_order_with_their_position(fake):
    service = await connected(fake, max_concurrency=1, max_queue=2)
    fake.replies.extend([Reply(["first", " reply"], hold_after=1), Reply(["second"]), Reply(["third"])])
    try:
        first = service.stream(request(label="first"))
        while not isinstance(await anext(first), TextDelta):
            pass
        second, third = service.stream(request(label="second")), service.stream(request(label="third"))
        assert await anext(second) == Queued(1)
        assert await anext(third) == Queued(2)
        with pytest.raises(ModelBusy):
            await anext(service.stream(request(label="fourth")))
        await second.aclose()  # the second one gives up; the third moves up
        assert await anext(third) == Queued(1)
        fake.release.set()
        assert [event async for event in first][-1].text == "first reply"
        rest = [event async for event in third]
        assert isinstance(rest[0], Started) and rest[-1].text == "second"
        assert len(fake.generate_requests) == 2 and fake.most_streaming == 1
    finally:
        await service.close()


async def test_a_newcomer_behind_one_running_and_one_waiting_request_is_second_in_line(fake):
    # The same meaning of the place as on the local backend: 1 goes to the model next.
    service = await connected(fake, max_concurrency=1)
    fake.replies.append(Reply(["first"], hold_after=0))
    running, waiting, newcomer = (service.stream(request(label=label)) for label in ("running", "waiting", "newcomer"))
    try:
        assert await anext(running) == Queued(1)
        assert await anext(waiting) == Queued(1)
        assert await anext(newcomer) == Queued(2)
    finally:
        for stream in (running, waiting, newcomer):
            await stream.aclose()
        await service.close()


async def test_waiting_in_line_past_the_queue_timeout_is_a_timeout(fake):
    service = await connected(fake, max_concurrency=1)
    fake.replies.append(Reply(["slow"], hold_after=0))
    holder = asyncio.create_task(events_of(service, request()))
    try:
        await fake.wait_for(lambda: fake.streaming == 1)
        with pytest.raises(ModelTimeout, match=r"waited more than 0.2 s"):
            await events_of(service, request(queue_timeout=0.2))
        assert len(fake.generate_requests) == 1
    finally:
        holder.cancel()
        await service.close()


async def test_closing_answers_the_requests_in_flight_and_in_line(fake):
    service = await connected(fake, max_concurrency=1)
    fake.replies.append(Reply(["Hello", " there"], hold_after=1))
    streaming, waiting = service.stream(request()), service.stream(request())
    while not isinstance(await anext(streaming), TextDelta):
        pass
    assert await anext(waiting) == Queued(1)
    await service.close()
    for stream in (streaming, waiting):
        with pytest.raises(ModelUnavailable, match="shutting down"):
            async for _ in stream:
                pass
    with pytest.raises(ModelUnavailable, match="shutting down"):
        await events_of(service, request())


# -- counting tokens, start-up ---------------------------------------------------------------


async def test_tokens_are_counted_by_the_server_with_images_as_their_marker_tokens(fake, service):
    text_only = await service.count_tokens(guided(["User: What is in this image?", "<end_of_utterance>", "\nAssistant:"]))
    one_image = await service.count_tokens(ONE_IMAGE)
    two_images = await service.count_tokens(guided(["User: What is in this image?", RED, BLUE, "<end_of_utterance>", "\nAssistant:"]))
    # <fake><image><fake> for an image; a second one right after it adds <image><fake>.
    assert (one_image - text_only, two_images - one_image) == (3, 2)
    assert all("base64" not in sent["inputs"] for sent in fake.tokenize_requests)
    assert service.info.name == "HuggingFaceM4/idefics-9b-instruct"


async def test_a_served_smolvlm_gets_its_chat_format_and_images_their_estimated_cost():
    async with FakeTGI(model_id="HuggingFaceTB/SmolVLM-Instruct") as fake:
        service = await connected(fake)
        try:
            chat = Chat((Message("system", ("Be brief.",)), Message("user", (RED, "And who is that?"), speaker="Ann")), reply_start="Category: ")
            await events_of(service, request(chat))
            text_only = await service.count_tokens(Chat((Message("user", ("And who is that?",), speaker="Ann"),)))
            with_image = await service.count_tokens(Chat((Message("user", (RED, "And who is that?"), speaker="Ann"),)))
        finally:
            await service.close()
    assert fake.generate_requests[0]["inputs"] == (
        f"<|im_start|>System: Be brief.<end_of_utterance>\nUser: [Ann]{uri(RED, 'image/png')}And who is that?<end_of_utterance>\nAssistant: Category:"
    )
    # Up to 4 x 4 tiles and the global image, 64 tokens and 2 markers each (the text around it differs by a space).
    assert abs(with_image - text_only - (17 * 66 + 4)) <= 1
    assert service.info.family == "smolvlm" and service.info.image_longest_edge == 2048


@pytest.mark.parametrize(
    "max_input, max_total, context",
    [(2047, 2048, 2048), (1024, 2048, 1024 + 512)],
    ids=["tgi-defaults", "short-inputs"],
)
async def test_the_context_keeps_prompts_within_the_servers_limits(max_input, max_total, context):
    async with FakeTGI(max_input_tokens=max_input, max_total_tokens=max_total) as fake:
        service = await connected(fake, reply_tokens=512)
        await service.close()
    assert service.info.context_tokens == context


@pytest.mark.parametrize(
    "fake_settings, backend_settings, message",
    [
        ({"model_id": "meta-llama/Llama-2-7b-chat-hf", "special_tokens": False}, {}, "not an IDEFICS model"),
        ({"api_key": "right"}, {"token": "wrong"}, "refused the bot's credentials .* TGI_TOKEN"),
    ],
    ids=["llama", "bad-token"],
)
async def test_start_up_refuses_what_it_cannot_serve(fake_settings, backend_settings, message):
    async with FakeTGI(**fake_settings) as fake:
        with pytest.raises(ModelLoadError, match=message):
            await TGIBackend.open(TGISettings(url=fake.url, **backend_settings))


async def test_start_up_explains_an_unreachable_server_and_a_wrong_address(fake):
    url = fake.url
    with pytest.raises(ModelLoadError, match=r"answered GET /info with HTTP 404.*root address"):
        await TGIBackend.open(TGISettings(url=f"{url}/v1"))
    await fake.server.__aexit__(None, None, None)
    with pytest.raises(ModelLoadError, match=f"Can't reach the TGI server at {url}.*Check \\[model\\] url"):
        await TGIBackend.open(TGISettings(url=url))


# -- configuration and the engine ------------------------------------------------------------


def test_the_tgi_backend_needs_a_url_and_takes_its_token_from_the_environment(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[model]\nbackend = "tgi"\n')
    with pytest.raises(ConfigError, match=r'\[model\]: backend = "tgi" needs url'):
        load_config(path, environ={})
    path.write_text('[model]\nbackend = "tgi"\nurl = "127.0.0.1:8080"\n')
    with pytest.raises(ConfigError, match=r"url must be an http:// or https:// address"):
        load_config(path, environ={})
    path.write_text('[model]\nbackend = "tgi"\nurl = "http://127.0.0.1:8080"\n')
    config = load_config(path, environ={"TGI_TOKEN": "hunter2"})
    assert config.model.token.get_secret_value() == "hunter2" and "hunter2" not in repr(config)


async def test_the_engine_runs_unchanged_on_the_tgi_backend(fake, tmp_path):
    fake.replies.append(Reply(["It", " is", " a", " red", " picture", ".", "<end_of_utterance>"]))
    config = write_config(
        tmp_path / "config.toml",
        f"""
[model]
backend = "tgi"
url = "{fake.url}"
[state]
path = "{tmp_path / 'state' / 'bot.sqlite3'}"
""",
    )
    png = image_bytes((220, 20, 20))

    async def read(max_bytes: int) -> bytes:
        return png

    message = IncomingMessage(
        key=ConversationKey("test", "channel"),
        author=Author("u1", "Ann"),
        text="What is in this image?",
        attachments=(Attachment("red.png", read, len(png), "image/png"),),
    )
    async with Runtime.open(config) as runtime:
        events = [event async for event in runtime.engine.reply(message)]
    assert isinstance(events[-1], Final) and events[-1].text == "It is a red picture."
    assert [event.text for event in events if isinstance(event, Partial)][-1] == "It is a red picture."
    inputs = fake.generate_requests[0]["inputs"]
    assert inputs.startswith(config.conversation.system_prompt) and inputs.endswith("<end_of_utterance>\nAssistant:")
    assert "User: What is in this image?![](data:image/png;base64," in inputs
    assert fake.tokenize_requests, "the engine fitted the conversation with the server's tokenizer"


# -- the size of a request -------------------------------------------------------------------


def detailed_png(seed: int, side: int = 448) -> bytes:
    """A photo-like worst case for compression: every pixel random."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def tgi_config(tmp_path, fake: FakeTGI, extra: str = ""):
    return write_config(
        tmp_path / "config.toml",
        f"""
[model]
backend = "tgi"
url = "{fake.url}"
{extra}
[generation]
max_new_tokens = 40
[state]
path = "{tmp_path / 'state' / 'bot.sqlite3'}"
""",
    )


def with_images(text: str, seeds: range) -> IncomingMessage:
    def attachment(seed: int) -> Attachment:
        data = detailed_png(seed)

        async def read(max_bytes: int) -> bytes:
            return data

        return Attachment(f"photo{seed}.png", read, len(data), "image/png")

    return IncomingMessage(ConversationKey("test", "channel"), Author("u1", "Ann"), text, tuple(attachment(seed) for seed in seeds))


async def final_of(runtime: Runtime, message: IncomingMessage) -> Final:
    events = [event async for event in runtime.engine.reply(message)]
    assert isinstance(events[-1], Final)
    return events[-1]


def image_sides(fake: FakeTGI) -> set[tuple[int, int]]:
    sides = set()
    for _, data in fake.images_seen:
        with Image.open(io.BytesIO(data)) as image:
            sides.add(image.size)
    return sides


async def test_eight_detailed_images_travel_within_the_servers_default_payload_limit(fake, tmp_path):
    # Four photos (the most one message takes) and four more in the history, each as detailed as
    # a photo can be: all eight reach the model, at the 224 px it sees, within the server's limit.
    async with Runtime.open(tgi_config(tmp_path, fake)) as runtime:
        first = await final_of(runtime, with_images("What are these?", range(4)))
        second = await final_of(runtime, with_images("And these?", range(4, 8)))
    assert first.text == second.text == "A red square." and not first.notes and not second.notes
    assert len(fake.generate_requests) == 2 and max(fake.body_sizes) <= fake.payload_limit
    assert fake.generate_requests[1]["inputs"].count("![](data:image/") == 8
    assert image_sides(fake) == {(224, 224)}


async def test_a_request_that_fits_as_stored_is_sent_as_stored(fake, tmp_path):
    async with Runtime.open(tgi_config(tmp_path, fake)) as runtime:
        await final_of(runtime, with_images("What is this?", range(1)))
        store = runtime.store
        [question, _] = await store.load_turns(ConversationKey("test", "channel"))
        stored = await store.get_image(question.images[0])
    assert [data for _, data in fake.images_seen] == [stored.data]


async def test_when_even_small_images_are_too_many_the_oldest_turns_are_left_out(fake, tmp_path):
    fake.payload_limit = 100_000  # two photos at 224 px fit (about 43 kB each as base64), three do not
    async with Runtime.open(tgi_config(tmp_path, fake, "payload_limit = 100_000")) as runtime:
        finals = [await final_of(runtime, with_images(f"Photo {n}?", range(n, n + 1))) for n in range(3)]
    assert [final.text for final in finals] == ["A red square."] * 3
    assert finals[2].notes == ("This conversation is now longer than I can read at once, so I no longer see its oldest messages.",)
    last = fake.generate_requests[-1]["inputs"]
    assert "Photo 0?" not in last and "Photo 1?" in last and last.count("![](data:") == 2
    assert max(fake.body_sizes) <= fake.payload_limit


async def test_a_message_whose_images_alone_are_too_large_is_told_to_send_fewer(fake, tmp_path):
    fake.payload_limit = 100_000
    async with Runtime.open(tgi_config(tmp_path, fake, "payload_limit = 100_000")) as runtime:
        final = await final_of(runtime, with_images("What are these?", range(4)))
        assert final.text == "" and "send fewer" in final.notes[0]
        assert await runtime.store.load_turns(ConversationKey("test", "channel")) == []
    assert not fake.generate_requests and not fake.body_sizes


async def test_a_task_whose_images_are_too_large_is_told_to_send_fewer(fake):
    service = await connected(fake, payload_limit=20_000)
    try:
        photo = ModelImage("photo", detailed_png(1), "photo.png")
        with pytest.raises(GenerationFailed, match="send fewer images"):
            await events_of(service, request(["User:", photo, photo, photo, "<end_of_utterance>", "\nAssistant:"]))
    finally:
        await service.close()
    assert not fake.body_sizes


async def test_an_answer_reads_each_of_its_stored_images_once(tmp_path, monkeypatch):
    # SmolVLM's image cost depends on the image, and the server limits a request's size: an answer
    # counts tokens and measures the request with the images themselves, then sends them.
    served = FakeTGI(model_id="HuggingFaceTB/SmolVLM-Instruct", max_input_tokens=16383, max_total_tokens=16384)
    async with served as fake, Runtime.open(tgi_config(tmp_path, fake)) as runtime:
        store, key, reads = runtime.store, ConversationKey("test", "channel"), Counter[ImageRef]()
        get_image = store.get_image

        async def counted(ref: ImageRef) -> ModelImage:
            reads[ref] += 1
            return await get_image(ref)

        monkeypatch.setattr(store, "get_image", counted)
        per_answer = []
        for answer in (
            runtime.engine.reply(with_images("What is this?", range(1))),
            runtime.engine.reply(with_images("And these?", range(1, 3))),
            runtime.engine.run_task(TaskRequest("caption", key, Author("u1", "Ann"), last_image=True)),
        ):
            reads.clear()
            events = [event async for event in answer]
            assert isinstance(events[-1], Final) and events[-1].text == "A red square."
            per_answer.append(dict(reads))
        first, _, second, _ = await store.load_turns(key)
        last = await store.last_image("test", "channel")
    assert per_answer == [dict.fromkeys(first.images, 1), dict.fromkeys([*first.images, *second.images], 1), {last: 1}]
