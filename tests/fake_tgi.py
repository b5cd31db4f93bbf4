"""A fake text-generation-inference server on 127.0.0.1, speaking TGI's documented API.

- `GET /info`: model_id, max_input_tokens, max_total_tokens, max_stop_sequences, max_concurrent_requests...
- `POST /tokenize` `{"inputs": ...}`: `[{"id", "text", "start", "stop"}, ...]`, with <s> first.
- `POST /generate_stream` `{"inputs": ..., "parameters": {...}}`: server-sent events
  `data:{"index":..,"token":{"id":..,"text":..,"logprob":..,"special":..},"generated_text":null,"details":null}`,
  the last one with `generated_text` and `details.finish_reason` ("length", "eos_token", "stop_sequence").
- `POST /generate` (the same body): one JSON answer; with `details` and `decoder_input_details`,
  `details.prefill` lists every input token `{"id", "text", "logprob"}` (the first one's logprob
  null), each logprob given by `FakeTGI.prefill_logprob(text)`.
- Errors are `{"error": "...", "error_type": "..."}`: as an HTTP status (422, 429, 503...) or, as
  TGI's router sends them once the stream has begun, as an event of a 200 stream (a stream the model
  ends without its final token: `incomplete_generation_stream`).
- A request body above `payload_limit` bytes (TGI's --payload-limit, 2,000,000 by default) is refused
  with HTTP 413 and axum's plain-text body, on every route.

Like TGI's router, it validates parameters and input length (images count as one `<image>`
token), decodes every `![](data:...)` image, stops as TGI's stopping criteria do (the length limit
is checked first, then end of sequence, then stop sequences, whose text is included in
`generated_text`; special tokens are left out of it), and checks the API key on every route but /info.
Tests script the replies, inject failures, and read back every request it got.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.loopback import FakeModelServer

SPECIAL = {"<fake_token_around_image>": 32000, "<image>": 32001, "<end_of_utterance>": 32002, "</s>": 2}
_IMAGE = re.compile(r"!\[\]\(([^)]*)\)")
_TOKEN = re.compile("|".join(re.escape(token) for token in SPECIAL) + r"|\w+|\s|[^\w\s]")
# What axum answers when a body is over DefaultBodyLimit (TGI's --payload-limit).
TOO_LARGE = "Failed to buffer the request body: length limit exceeded"


@dataclass
class Reply:
    """What the model "generates": token texts in order (special ones are sent as special tokens).
    `cut_after`: the connection is dropped after that many tokens. `incomplete_after`: the model's
    stream ends after that many tokens without a final one, and the router says so in an error event.
    `hold_after`: the stream pauses after that many tokens until the test sets `gate`, or
    `FakeTGI.release` if it has none."""

    tokens: list[str]
    cut_after: int | None = None
    incomplete_after: int | None = None
    hold_after: int | None = None
    gate: asyncio.Event | None = None


@dataclass
class Failure:
    """An error answer to the next /generate_stream request."""

    status: int
    error: str = "Model is overloaded"
    error_type: str = "overloaded"
    headers: dict[str, str] = field(default_factory=dict)
    in_stream: bool = False  # a 200 stream whose first event is the error, as TGI's router does


def tokenize(text: str) -> list[dict]:
    """A toy tokenizer with IDEFICS' special tokens: words, single spaces and punctuation."""
    tokens = [{"id": 1, "text": "", "start": 0, "stop": 0}]  # <s>
    for match in _TOKEN.finditer(text):
        piece = match.group()
        tokens.append({"id": SPECIAL.get(piece, 100 + len(piece)), "text": piece, "start": match.start(), "stop": match.end()})
    return tokens


class FakeTGI(FakeModelServer):
    def __init__(
        self,
        model_id: str = "HuggingFaceM4/idefics-9b-instruct",
        max_input_tokens: int = 1024,
        max_total_tokens: int = 2048,
        max_stop_sequences: int = 4,
        max_concurrent_requests: int = 128,
        api_key: str | None = None,
        special_tokens: bool = True,
        payload_limit: int = 2_000_000,
    ):
        self.model_id = model_id
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        self.max_stop_sequences = max_stop_sequences
        self.max_concurrent_requests = max_concurrent_requests
        self.api_key = api_key
        self.special_tokens = special_tokens  # False: a tokenizer that splits <image> like any text
        self.payload_limit = payload_limit
        self.replies: deque[Reply] = deque()
        self.default_reply = Reply(["A", " red", " square", ".", "<end_of_utterance>"])
        self.failures: deque[Failure] = deque()
        self.tokenize_gate: asyncio.Event | None = None  # when set to an Event, /tokenize answers once it is set
        self.prefill_logprob: Callable[[str], float] = lambda text: -1.0
        self.generate_requests: list[dict] = []
        self.generate_headers: list[dict[str, str]] = []
        self.tokenize_requests: list[dict] = []
        self.body_sizes: list[int] = []  # of every /generate_stream request, refused ones too
        self.disconnects = 0
        self.streaming = 0
        self.most_streaming = 0
        super().__init__({"/info": self._info, "/tokenize": self._tokenize, "/generate_stream": self._generate_stream, "/generate": self._generate})

    @property
    def url(self) -> str:
        return self.server.url("")

    # -- routes ------------------------------------------------------------------------------

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_id": self.model_id,
                "model_sha": None,
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": self.max_concurrent_requests,
                "max_best_of": 2,
                "max_stop_sequences": self.max_stop_sequences,
                "max_input_tokens": self.max_input_tokens,
                "max_total_tokens": self.max_total_tokens,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": "3.3.5",
                "sha": None,
                "docker_label": None,
            }
        )

    def _authorized(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization", "").lower() == f"bearer {self.api_key}".lower()

    async def _body(self, request: web.Request) -> dict | web.Response:
        """The JSON body, or the 413 that TGI's router answers to one above its payload limit."""
        raw = b""
        while len(raw) <= self.payload_limit and not request.content.at_eof():
            raw += await request.content.read(self.payload_limit + 1 - len(raw))
        if request.path == "/generate_stream":
            await self._record(lambda: self.body_sizes.append(request.content_length or len(raw)))
        if len(raw) > self.payload_limit:
            return web.Response(status=413, text=TOO_LARGE)
        return json.loads(raw)

    async def _tokenize(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        await self._record(lambda: self.tokenize_requests.append(body))
        if self.tokenize_gate is not None:
            await self.tokenize_gate.wait()
        text = _IMAGE.sub("<image>", body["inputs"])
        tokens = tokenize(text)
        if not self.special_tokens:
            tokens = [token for piece in tokens for token in self._split(piece)]
        return web.json_response(tokens)

    @staticmethod
    def _split(token: dict) -> list[dict]:
        if token["text"] not in SPECIAL:
            return [token]
        return [{"id": 50 + i, "text": ch, "start": token["start"] + i, "stop": token["start"] + i + 1} for i, ch in enumerate(token["text"])]

    async def _generation_body(self, request: web.Request) -> dict | web.Response:
        """A generation request's body, recorded; or the answer to an unauthorized or too large one."""
        if not self._authorized(request):
            return web.Response(status=401)
        body = await self._body(request)
        if isinstance(body, dict):
            await self._record(lambda: (self.generate_requests.append(body), self.generate_headers.append(dict(request.headers))))
        return body

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = await self._generation_body(request)
        if isinstance(body, web.Response):
            return body
        if self.failures:
            failure = self.failures.popleft()
            error = {"error": failure.error, "error_type": failure.error_type}
            if failure.in_stream:
                return await self._stream_error(request, error)
            return web.json_response(error, status=failure.status, headers=failure.headers)
        problem = self._validate(body)
        if problem is not None:
            return await self._stream_error(request, {"error": f"Input validation error: {problem}", "error_type": "validation"})
        return await self._stream(request, body)

    async def _generate(self, request: web.Request) -> web.Response:
        body = await self._generation_body(request)
        if isinstance(body, web.Response):
            return body
        problem = self._validate(body)
        if problem is not None:
            return web.json_response({"error": f"Input validation error: {problem}", "error_type": "validation"}, status=422)
        parameters = body.get("parameters", {})
        reply = self.replies.popleft() if self.replies else self.default_reply
        tokens = reply.tokens[: parameters.get("max_new_tokens", 100)]
        answer: dict = {"generated_text": "".join(text for text in tokens if text not in SPECIAL)}
        if parameters.get("details"):
            answer["details"] = {"finish_reason": "length", "generated_tokens": len(tokens), "seed": None}
            if parameters.get("decoder_input_details"):
                prefill = tokenize(_IMAGE.sub("<image>", body["inputs"]))
                answer["details"]["prefill"] = [
                    {"id": token["id"], "text": token["text"], "logprob": None if at == 0 else self.prefill_logprob(token["text"])}
                    for at, token in enumerate(prefill)
                ]
        return web.json_response(answer)

    def _validate(self, body: dict) -> str | None:
        inputs, parameters = body.get("inputs"), body.get("parameters", {})
        if not isinstance(inputs, str) or not inputs:
            return "`inputs` cannot be empty"
        for uri in _IMAGE.findall(inputs):
            problem = self._decode_image(uri)
            if problem:
                return problem
        if len(parameters.get("stop", [])) > self.max_stop_sequences:
            return f"`stop` supports up to {self.max_stop_sequences} stop sequences. Given: {len(parameters['stop'])}"
        if "temperature" in parameters and parameters["temperature"] <= 0:
            return "`temperature` must be strictly positive"
        if "top_p" in parameters and not 0 < parameters["top_p"] < 1:
            return "`top_p` must be > 0.0 and < 1.0"
        length = len(tokenize(_IMAGE.sub("<image>", inputs)))
        if length > self.max_input_tokens:
            return f"`inputs` must have less than {self.max_input_tokens} tokens. Given: {length}"
        new_tokens = parameters.get("max_new_tokens", 100)
        if length + new_tokens > self.max_total_tokens:
            return f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. Given: {length} `inputs` tokens and {new_tokens} `max_new_tokens`"
        return None

    def _decode_image(self, uri: str) -> str | None:
        if not uri.startswith("data:"):
            return f"invalid image content: {uri[:40]}"  # the fake never fetches links
        return self._data_image(uri)

    async def _open(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(b":\n\n")  # a keep-alive comment, as TGI's server sends now and then
        return response

    async def _stream_error(self, request: web.Request, error: dict) -> web.StreamResponse:
        response = await self._open(request)
        await response.write(f"data:{json.dumps(error)}\n\n".encode())
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        parameters = body.get("parameters", {})
        reply = self.replies.popleft() if self.replies else self.default_reply
        stops, limit = parameters.get("stop", []), parameters.get("max_new_tokens", 100)
        tokens = [*reply.tokens, "</s>"]  # a script that runs out ends with EOS
        response = await self._open(request)
        await self._record(lambda: setattr(self, "streaming", self.streaming + 1))
        self.most_streaming = max(self.most_streaming, self.streaming)
        decoded, generated = "", ""
        try:
            for index, text in enumerate(tokens, start=1):
                if reply.cut_after is not None and index > reply.cut_after:
                    request.transport.close()  # the connection drops in the middle of the answer
                    return response
                if reply.incomplete_after is not None and index > reply.incomplete_after:
                    error = {"error": "Incomplete generation stream", "error_type": "incomplete_generation_stream"}
                    await response.write(f"data:{json.dumps(error)}\n\n".encode())
                    break
                if reply.hold_after is not None and index > reply.hold_after:
                    await (reply.gate or self.release).wait()
                special = text in SPECIAL
                decoded += text
                generated += "" if special else text
                # TGI's StoppingCriteria: the length limit first, then end of sequence, then stop sequences.
                if index >= limit:
                    reason = "length"
                elif text == "</s>":
                    reason = "eos_token"
                elif any(stop in decoded for stop in stops):
                    reason = "stop_sequence"
                else:
                    reason = None
                event = {
                    "index": index,
                    "token": {"id": SPECIAL.get(text, 100 + len(text)), "text": text, "logprob": -0.25, "special": special},
                    "generated_text": None if reason is None else generated,
                    "details": None,
                }
                if reason is not None and parameters.get("details"):
                    event["details"] = {"finish_reason": reason, "generated_tokens": index, "seed": None, "input_length": 7}
                await response.write(f"data:{json.dumps(event)}\n\n".encode())
                if reason is not None:
                    break
            await response.write_eof()
            return response
        except asyncio.CancelledError:  # the client hung up
            await self._record(lambda: setattr(self, "disconnects", self.disconnects + 1))
            raise
        finally:
            await self._record(lambda: setattr(self, "streaming", self.streaming - 1))
