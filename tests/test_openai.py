"""The OpenAI-compatible backend against a fake OpenAI-compatible server on 127.0.0.1 (vLLM's,
llama.cpp's and Ollama's flavors): start-up checks, the request as messages, streaming, the payload
budget, counting tokens, errors and retries, classification, and cancellation. Most tests drive
the bot's engine (what every adapter calls) or the `idefics-bot` command itself through the fake."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import subprocess
from contextlib import aclosing
from pathlib import Path

import aiohttp
import pytest
from PIL import Image
from transformers import AutoTokenizer

from bot.runtime.app import Runtime
from bot.runtime.config import load_config
from bot.runtime.health import HealthServer
from bot.settings import ConfigError
from ground.conversation import Author, ConversationKey, ImageRef
from ground.messages import Attachment, Final, IncomingMessage, Partial, TaskRequest, Waiting
from model.openai import CUT, DEFAULT_CONTEXT_TOKENS, OpenAIBackend, OpenAISettings
from model.service import Chat, GenerationParams, GenerationRequest, Message, ModelLoadError, Queued
from tests.conftest import image_bytes, write_config
from tests.fake_openai import Failure, FakeOpenAI, Reply
from tests.test_cli import COMMAND, environment

MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
SLOT = ImageRef(digest="d", name="photo.png")  # counting needs an image's place, not its pixels
KEY = "sk-test-s3cret"
VLLM_TOO_LONG = {
    "error": {
        "message": "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (1700 in the messages, 400 in the completion). "
        "Please reduce the length of the messages or completion.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}


@pytest.fixture
async def fake():
    async with FakeOpenAI() as server:
        yield server


def openai_config(tmp_path: Path, fake: FakeOpenAI, extra: str = "", model: str = MODEL, sections: str = ""):
    return write_config(
        tmp_path / "config.toml",
        f"""
[model]
backend = "openai"
url = "{fake.url}"
model = "{model}"
queue_timeout_s = 30
{extra}
[generation]
max_new_tokens = 40
[state]
path = "{tmp_path / "state" / "bot.sqlite3"}"
{sections}
""",
    )


def attachment(data: bytes, name: str = "red.png") -> Attachment:
    async def read(max_bytes: int) -> bytes:
        return data

    return Attachment(name, read, len(data), "image/png")


ANN = Author("u1", "Ann")


def message(text: str, *images: bytes, author: Author = ANN, thread: str = "") -> IncomingMessage:
    """A message; in a thread, one of a conversation several people share."""
    attachments = tuple(attachment(data, f"image{n}.png") for n, data in enumerate(images))
    return IncomingMessage(ConversationKey("test", "channel", thread), author, text, attachments, shared=bool(thread))


async def reply_events(runtime: Runtime, incoming: IncomingMessage) -> list:
    return [event async for event in runtime.engine.reply(incoming)]


async def final_of(runtime: Runtime, incoming: IncomingMessage) -> Final:
    events = await reply_events(runtime, incoming)
    assert isinstance(events[-1], Final)
    return events[-1]


def said(final: Final) -> tuple[str, tuple[str, ...]]:
    return final.text, final.notes


async def task(runtime: Runtime, name: str, *images: bytes, labels: str = "", question: str = "") -> Final:
    request = TaskRequest(
        name, ConversationKey("test", "tasks"), Author("u1", "Ann"), tuple(attachment(data) for data in images), question=question, labels=labels
    )
    events = [event async for event in runtime.engine.run_task(request)]
    assert isinstance(events[-1], Final)
    return events[-1]


RED, BLUE = image_bytes((220, 20, 20)), image_bytes((20, 20, 220))


# -- configuration ---------------------------------------------------------------------------


def test_the_openai_backend_needs_url_and_model_and_takes_its_key_from_openai_api_key(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[model]\nbackend = "openai"\nurl = "http://127.0.0.1:8000/v1"\n')
    with pytest.raises(ConfigError, match=r'backend = "openai" needs url, .* and model'):
        load_config(path, environ={})
    path.write_text(f'[model]\nbackend = "openai"\nurl = "http://127.0.0.1:8000/v1"\nmodel = "{MODEL}"\n')
    config = load_config(path, environ={"OPENAI_API_KEY": KEY, "TGI_TOKEN": "not-this-one"})
    assert config.model.token is not None and config.model.token.get_secret_value() == KEY
    assert KEY not in repr(config)


# -- start-up --------------------------------------------------------------------------------


async def run_command(*args: str, cwd: Path, env: dict | None = None, stdin: str = "") -> tuple[int, str, str]:
    """`idefics-bot ARGS` as a subprocess, while this event loop keeps serving the fake."""
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        cwd=cwd,
        env=environment(env),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 120)
    assert b"Traceback" not in out + err, err.decode()
    return process.returncode or 0, out.decode(), err.decode()


async def test_ask_answers_through_the_server(fake, tmp_path):
    (tmp_path / "red.png").write_bytes(RED)
    openai_config(tmp_path, fake)
    status, out, err = await run_command("ask", "--image", "red.png", "What is this?", cwd=tmp_path)
    assert (status, out.strip()) == (0, "A red square."), err
    assert fake.chat_requests[0]["model"] == MODEL


async def test_the_terminal_chat_streams_through_the_server_and_shows_a_cut_answer(fake, tmp_path):
    (tmp_path / "red.png").write_bytes(RED)
    openai_config(tmp_path, fake)
    fake.replies.extend([Reply(["It", " is", " red", "."]), Reply(["Once", " upon", " a", " time"], cut_after=3)])
    status, out, err = await run_command("chat", cwd=tmp_path, stdin="/image red.png\nWhat is this?\nTell me a story\n/quit\n")
    assert status == 0, err
    assert "It is red.\nyou> " in out and f"Once upon a\n({CUT})" in out
    assert [entry["role"] for entry in fake.chat_requests[-1]["messages"]] == ["system", "user", "assistant", "user"]


async def test_start_up_problems_are_one_paragraph_that_never_shows_the_key(fake, tmp_path):
    openai_config(tmp_path, fake)
    fake.api_key = KEY
    status, _, err = await run_command("ask", "What is this?", cwd=tmp_path, env={"OPENAI_API_KEY": "sk-wrong-key"})
    assert status == 1 and "refused the bot's API key (HTTP 401)" in err and "OPENAI_API_KEY" in err
    assert "sk-wrong-key" not in err and len(err.strip().splitlines()) == 1, err

    openai_config(tmp_path, fake, model="HuggingFaceTB/SmolVLM-Instruct")
    status, _, err = await run_command("ask", "What is this?", cwd=tmp_path, env={"OPENAI_API_KEY": KEY})
    assert status == 1 and f"doesn't serve HuggingFaceTB/SmolVLM-Instruct (it serves: {MODEL})" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_render_prints_the_messages_an_openai_server_gets(tmp_path):
    (tmp_path / "config.toml").write_text(f'[model]\nbackend = "openai"\nurl = "http://127.0.0.1:9/v1"\nmodel = "{MODEL}"\n')
    result = subprocess.run(
        [*COMMAND, "render", "--task", "classify", "--image", "cat.png", "--labels", "cat, dog"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment(),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ['"user: "', "\"Instruction: Classify the following image into a single category from the following list: ['cat', 'dog'].\\n\""]
    assert "<image cat.png>" in lines and '"assistant: "' in lines and '"Category: "' in lines


async def test_an_unreachable_server_is_a_start_up_paragraph(fake, tmp_path):
    url = fake.url
    await fake.server.__aexit__(None, None, None)
    with pytest.raises(ModelLoadError, match=f"Can't reach the model server at {url} .*Check \\[model\\] url"):
        await OpenAIBackend.open(OpenAISettings(url=url, model=MODEL))


async def test_health_follows_the_servers_reachability(fake, tmp_path):
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        health = HealthServer("127.0.0.1", 0, runtime.model, runtime.metrics, dict)
        await health.start()
        try:
            async with aiohttp.ClientSession() as http:

                async def healthz() -> tuple[int, dict]:
                    async with http.get(f"http://127.0.0.1:{health.port}/healthz") as response:
                        return response.status, (await response.json())["model"]

                assert await healthz() == (200, {"connected": True, "server_reachable": True})
                await fake.server.__aexit__(None, None, None)  # the server goes away
                final = await final_of(runtime, message("Still there?"))
                assert "can't reach the model server" in final.notes[0]
                assert await healthz() == (503, {"connected": True, "server_reachable": False})
        finally:
            await health.stop()


# -- the request and the stream --------------------------------------------------------------


async def test_a_conversation_goes_as_messages_with_images_in_order_and_speaker_names(fake, tmp_path):
    fake.replies.extend([Reply(["Red", "."]), Reply(["Blue", " and", " red", "."])])
    config = openai_config(tmp_path, fake, extra="token = 'sk-test-s3cret'")
    fake.api_key = KEY
    async with Runtime.open(config) as runtime:
        first = await reply_events(runtime, message("What is this?", RED, thread="t1"))
        second = await final_of(runtime, message("And these two?", BLUE, RED, author=Author("u2", "Bo"), thread="t1"))
    assert [event.text for event in first if isinstance(event, Partial)][-1] == "Red."
    assert second.text == "Blue and red."
    sent = fake.chat_requests[-1]
    roles = [entry["role"] for entry in sent["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert sent["messages"][0]["content"] == config.conversation.system_prompt
    question = sent["messages"][3]["content"]
    assert question[0] == {"type": "text", "text": "[Bo] And these two?"}
    parts = [part for entry in sent["messages"] if isinstance(entry["content"], list) for part in entry["content"]]
    urls = [part["image_url"]["url"] for part in parts if part["type"] == "image_url"]
    assert len(urls) == 3 and all(url.startswith("data:image/") for url in urls)
    assert sent["messages"][2]["content"] == "Red."
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 40 and sent["temperature"] == 0 and len(sent["stop"]) <= 4
    assert fake.chat_headers[-1]["Authorization"] == f"Bearer {KEY}"


async def test_sampling_settings_and_the_seed_reach_the_server(fake, tmp_path):
    config = openai_config(tmp_path, fake, sections="")
    config = config.model_copy(update={"generation": config.generation.model_copy(update={"do_sample": True, "temperature": 0.7, "top_p": 0.9})})
    async with Runtime.open(config) as runtime:
        await final_of(runtime, message("Hi"))
        seeded = GenerationParams(max_new_tokens=9, do_sample=True, temperature=0.5, top_p=1.0, seed=42)
        await runtime.model.generate(GenerationRequest(Chat((Message("user", ("Hi",)),)), seeded))
    sent, again = fake.chat_requests
    assert (sent["temperature"], sent["top_p"], "seed" in sent) == (0.7, 0.9, False)
    assert (again["temperature"], again["top_p"], again["seed"], again["max_tokens"]) == (0.5, 1.0, 42, 9)


async def test_a_reply_at_the_length_limit_is_a_normal_end(fake, tmp_path):
    fake.replies.append(Reply([" one", " two", " three", " four"] * 20))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await final_of(runtime, message("Count"))
        metrics = runtime.metrics.render().decode()
    assert final.text.startswith("one two three") and not final.notes
    assert 'idefics_replies_total{outcome="length"} 1.0' in metrics


async def test_keep_alives_unknown_fields_and_the_usage_chunk_are_read_as_the_protocol_says(tmp_path):
    async with FakeOpenAI(flavor="llamacpp") as fake:  # chunks carry llama.cpp's `timings` too
        fake.replies.append(Reply(["It", " is", " red", "."]))
        async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
            events = await reply_events(runtime, message("What?", RED))
            metrics = runtime.metrics.render().decode()
    assert said(events[-1]) == ("It is red.", ())
    assert "idefics_generated_tokens_total 4.0" in metrics  # from the usage chunk


# -- the payload budget ----------------------------------------------------------------------


def detailed_png(seed: int, side: int = 512) -> bytes:
    """A photo-like worst case for compression: every pixel random."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_images_are_re_encoded_then_the_oldest_turns_dropped_to_stay_under_the_budget(tmp_path):
    # A proxy in front that takes at most this much: two photos fit once re-encoded small, three don't.
    async with FakeOpenAI(payload_limit=100_000) as fake:
        config = openai_config(tmp_path, fake, extra="payload_limit = 100_000")
        async with Runtime.open(config) as runtime:
            finals = [await final_of(runtime, message(f"Photo {n}?", detailed_png(n))) for n in range(3)]
    assert [final.text for final in finals] == ["A red square."] * 3
    assert max(fake.body_sizes) <= 100_000 and len(fake.body_sizes) == 3
    assert {kind for kind, _ in fake.images_seen} == {"image/jpeg"}, "re-encoded"
    assert finals[2].notes == ("This conversation is now longer than I can read at once, so I no longer see its oldest messages.",)
    last = json.dumps(fake.chat_requests[-1]["messages"])
    assert "Photo 0?" not in last and "Photo 1?" in last and last.count("data:image/") == 2


async def test_a_photo_that_fits_as_stored_is_sent_as_stored(fake, tmp_path):
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        await final_of(runtime, message("What is this?", detailed_png(1)))
        [question, _] = await runtime.store.load_turns(ConversationKey("test", "channel"))
        stored = await runtime.store.get_image(question.images[0])
    assert [data for _, data in fake.images_seen] == [stored.data]


async def test_a_proxys_413_says_what_to_change(tmp_path):
    # The proxy's limit is below the bot's budget.
    async with FakeOpenAI(payload_limit=20_000) as fake, Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await final_of(runtime, message("What?", detailed_png(1, side=128)))
    assert final.text == "" and "HTTP 413" in final.notes[0] and "[model] payload_limit" in final.notes[0]
    assert len(fake.body_sizes) == 1, "not retried"


# -- counting tokens -------------------------------------------------------------------------


async def test_tokens_are_counted_by_the_servers_tokenize_with_its_own_image_size(fake, tmp_path):
    fake.image_tokens = 77
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        model = runtime.model
        assert isinstance(model, OpenAIBackend)
        await final_of(runtime, message("What is this?", RED))
    assert model.info.context_tokens == fake.max_model_len
    counted = [request for request in fake.tokenize_requests if "base64" not in json.dumps(request)]
    assert counted, "the conversation was counted without sending its images"
    assert model._image_tokens == 77


async def test_llama_cpp_counts_with_its_tokenize(tmp_path):
    async with FakeOpenAI(flavor="llamacpp") as fake, Runtime.open(openai_config(tmp_path, fake)) as runtime:
        await final_of(runtime, message("What is this?", RED))
    assert any("content" in request for request in fake.tokenize_requests)


async def test_without_tokenize_a_cached_tokenizer_counts_else_the_stated_estimate(tmp_path, tiny_checkpoint):
    async with FakeOpenAI(flavor="ollama", models=(str(tiny_checkpoint), MODEL)) as fake:
        with_tokenizer = await OpenAIBackend.open(OpenAISettings(url=fake.url, model=str(tiny_checkpoint)))
        estimating = await OpenAIBackend.open(OpenAISettings(url=fake.url, model=MODEL))
        try:
            assert (with_tokenizer._counting, estimating._counting) == ("tokenizer", "estimate")
            assert estimating.info.context_tokens == DEFAULT_CONTEXT_TOKENS
            chat = Chat((Message("system", ("Be kind.",)), Message("user", ("Hello there, what is this?", SLOT))))
            # The estimate: a token per 3 bytes, 8 a message, 850 an image.
            assert await estimating.count_tokens(chat) == math.ceil(len("Be kind.Hello there, what is this?") / 3) + 2 * 8 + 850
            tokens = AutoTokenizer.from_pretrained(tiny_checkpoint)("Be kind.Hello there, what is this?", add_special_tokens=False).input_ids
            assert await with_tokenizer.count_tokens(chat) == len(tokens) + 2 * 8 + 850
        finally:
            await with_tokenizer.close()
            await estimating.close()
    assert not fake.tokenize_requests


async def test_a_context_length_refusal_is_the_usual_too_long_answer_and_counted(fake, tmp_path):
    fake.failures.append(Failure(400, VLLM_TOO_LONG))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await final_of(runtime, message("A long question"))
        metrics = runtime.metrics.render().decode()
    assert final.text == "" and "too long" in final.notes[0]
    assert 'idefics_errors_total{kind="too_long"} 1.0' in metrics


async def test_a_context_refusal_inside_the_stream_is_too_long_too(fake, tmp_path):
    fake.replies.append(Reply(["never"], error_after=0, error=VLLM_TOO_LONG["error"]))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await final_of(runtime, message("A long question"))
        metrics = runtime.metrics.render().decode()
    assert final.text == "" and "too long" in final.notes[0]
    assert 'idefics_errors_total{kind="too_long"} 1.0' in metrics


async def test_llama_cpp_context_refusal_is_too_long_too_and_its_context_is_read_from_props(tmp_path):
    async with FakeOpenAI(flavor="llamacpp", max_model_len=3000) as fake, Runtime.open(openai_config(tmp_path, fake)) as runtime:
        assert runtime.model.info.context_tokens == 3000
        refusal = {
            "code": 400,
            "message": "request (3100 tokens) exceeds the available context size (3000 tokens), try increasing it",
            "type": "exceed_context_size_error",
        }
        fake.failures.append(Failure(400, {"error": refusal}))
        final = await final_of(runtime, message("A long question"))
    assert final.text == "" and "too long" in final.notes[-1]


# -- errors and retries ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_waited_out_in_line_and_the_reply_arrives_once(fake, tmp_path, status):
    fake.failures.extend([Failure(status, headers={"Retry-After": "0"})] * 2)
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        events = await reply_events(runtime, message("Hi"))
    assert len(fake.chat_requests) == 3
    assert [event for event in events if isinstance(event, Waiting)], "the queue position is shown meanwhile"
    assert said(events[-1]) == ("A red square.", ())


async def test_retry_after_beyond_the_queue_timeout_is_busy_at_once(fake, tmp_path):
    fake.failures.append(Failure(429, headers={"Retry-After": "3600"}))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await final_of(runtime, message("Hi"))
    assert "busy" in final.notes[0] and len(fake.chat_requests) == 1


async def test_a_quota_429_is_not_waited_for(fake, tmp_path):
    quota = {"message": "You exceeded your current quota", "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}
    fake.failures.append(Failure(429, {"error": quota}))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await final_of(runtime, message("Hi"))
    assert "out of quota" in final.notes[0] and len(fake.chat_requests) == 1


async def test_a_5xx_is_retried_once(fake, tmp_path):
    fake.failures.append(Failure(502, "<html><body><h1>502 Bad Gateway</h1></body></html>"))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        recovered = await final_of(runtime, message("Hi"))
        fake.failures.extend([Failure(500, {"object": "error", "message": "engine dead", "type": "InternalServerError", "code": 500})] * 3)
        failed = await final_of(runtime, message("Again"))
    assert said(recovered) == ("A red square.", ())
    assert failed.text == "" and "hit an error while answering" in failed.notes[0]
    assert len(fake.chat_requests) == 2 + 2, "each retried exactly once"


@pytest.mark.parametrize("ending", [{"cut_after": 3}, {"error_after": 3}], ids=["connection-cut", "error-event"])
async def test_a_stream_cut_mid_way_keeps_its_text_and_says_so(fake, tmp_path, ending):
    fake.replies.append(Reply(["Once", " upon", " a", " time"], **ending))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await final_of(runtime, message("A story"))
        [_, answer] = await runtime.store.load_turns(ConversationKey("test", "channel"))
    assert said(final) == ("Once upon a", (CUT,))
    assert answer.text == "Once upon a"
    assert len(fake.chat_requests) == 1


async def test_a_malformed_chunk_ends_the_answer_with_a_clear_message_only(fake, tmp_path):
    fake.replies.append(Reply(["It", " is", " a", " cat"], malformed_after=2))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await final_of(runtime, message("What?"))
    assert said(final) == ("", ("The model server sent a reply I couldn't read. Please try again.",))
    assert len(fake.chat_requests) == 1


# -- tasks -----------------------------------------------------------------------------------


async def test_classification_weighs_the_labels_with_vllms_prompt_logprobs(fake, tmp_path):
    fake.prompt_logprob = lambda piece: {"dog": -0.2, "cat": -2.5}.get(piece, -1.0)
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await task(runtime, "classify", RED, labels="cat, dog")
    assert final.text.startswith("dog (") and "then cat" in final.text and "approximate" not in final.text
    scored = [request for request in fake.chat_requests if request.get("prompt_logprobs") is not None]
    assert len(scored) == 2 and all(request["continue_final_message"] for request in scored)


async def test_classification_elsewhere_matches_the_label_the_model_names_and_says_it_is_approximate(tmp_path):
    async with FakeOpenAI(flavor="ollama") as fake:
        fake.replies.append(Reply([" Dog", "."]))
        async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
            final = await task(runtime, "classify", RED, labels="cat, dog")
    assert final.text.startswith("dog (approximate")
    assert all("prompt_logprobs" not in request for request in fake.chat_requests)


async def test_a_story_is_generated_without_beam_search(fake, tmp_path):
    fake.replies.append(Reply(["Once", " upon", " a", " time", "."]))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        final = await task(runtime, "story", RED)
    assert final.text == "Once upon a time."
    assert not {"n", "best_of", "use_beam_search", "num_beams"} & set(fake.chat_requests[0])


# -- cancellation and the line ---------------------------------------------------------------


async def test_stop_closes_the_http_stream(fake, tmp_path):
    fake.replies.append(Reply(["Hello", " there", " friend"], hold_after=1))
    async with Runtime.open(openai_config(tmp_path, fake)) as runtime:
        async with aclosing(runtime.engine.reply(message("Hi"))) as events:
            async for event in events:
                if isinstance(event, Partial):
                    break
        await fake.wait_for(lambda: fake.disconnects == 1 and fake.streaming == 0)


async def test_the_queue_place_means_what_it_means_on_the_other_backends(fake):
    service = await OpenAIBackend.open(OpenAISettings(url=fake.url, model=MODEL, max_concurrency=1))
    fake.replies.append(Reply(["first"], hold_after=0))
    from tests.test_tgi import request as generation_request

    running, waiting, newcomer = (service.stream(generation_request()) for _ in range(3))
    try:
        assert await anext(running) == Queued(1)
        assert await anext(waiting) == Queued(1)
        assert await anext(newcomer) == Queued(2)
    finally:
        for stream in (running, waiting, newcomer):
            await stream.aclose()
        await service.close()
