"""A fake OpenAI-compatible server on 127.0.0.1, written from the public API references: OpenAI's
chat completions and streaming reference, vLLM's OpenAI-compatible server, llama.cpp's server
README and Ollama's OpenAI compatibility page. `flavor` picks whose extras it has:

- every flavor: `GET /v1/models` -> `{"object": "list", "data": [{"id", "object": "model", ...}]}`;
  `POST /v1/chat/completions` with `messages` whose content is a string or a list of parts
  (`{"type": "text", "text"}`, `{"type": "image_url", "image_url": {"url": "data:..."}}`),
  `max_tokens`, `temperature`, `top_p`, `seed`, `stop` (at most 4), `stream`, `stream_options`.
  A stream is `data: <chunk>` events separated by a blank line and ended by `data: [DONE]`: the
  first chunk carries only the role, text chunks carry `delta.content`, the last text comes with
  `finish_reason` ("stop", "length"), and with `stream_options.include_usage` one more chunk with
  `"choices": []` carries the usage. Keep-alive comment lines (`: ping`) come now and then. A stop
  string is never streamed. Without `stream`, one `chat.completion` object.
- "vllm" (and SGLang): `max_model_len` in the model list; `POST /tokenize` (outside /v1) with
  `{"model", "messages", "add_generation_prompt", "continue_final_message"}` -> `{"count",
  "max_model_len", "tokens"}`; `prompt_logprobs` on chat completions (with `continue_final_message`)
  -> a top-level `prompt_logprobs` list, None for the first token, else `{id: {"logprob", "rank",
  "decoded_token"}}`; errors `{"error": {"message", "type", "param", "code"}}` (older:
  `{"object": "error", ...}`); a prompt past the context: 400 "This model's maximum context length
  is N tokens. However, you requested M tokens ..."; a wrong key: 401 `{"error": "Unauthorized"}`.
- "llamacpp": `GET /health`; `GET /props` (`default_generation_settings.n_ctx`); `POST /tokenize` `{"content"}` -> `{"tokens"}`; errors `{"error": {"code",
  "message", "type"}}`; a prompt past the context: 400 `exceed_context_size_error`; chunks carry `timings`.
- "ollama": no /tokenize, no prompt log-probabilities; only `data:` image URIs; the key's value is
  ignored; a prompt past the context is silently cut (as Ollama does with num_ctx).

The toy chat template counts each message as its role, its text's words and punctuation, and
`image_tokens` per image. Tests script replies, inject failures, and read back every request.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from tests.loopback import FakeModelServer

_TOKEN = re.compile(r"\w+|\s|[^\w\s]")
Flavor = Literal["vllm", "llamacpp", "ollama"]


@dataclass
class Reply:
    """What the model "generates", as text pieces in order. `cut_after`: the connection drops after
    that many pieces. `hold_after`: the stream pauses there until `gate` (or the server's `release`)
    is set. `malformed_after`: a chunk that isn't JSON comes there. `error_after`: the error event
    `error` comes there (then `[DONE]`), as vLLM sends when the engine fails mid-stream."""

    pieces: list[str]
    cut_after: int | None = None
    hold_after: int | None = None
    gate: asyncio.Event | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    error: dict = field(default_factory=lambda: {"message": "engine died", "type": "InternalServerError", "code": 500})


@dataclass
class Failure:
    """The answer to the next chat completion request instead of a reply."""

    status: int
    body: str | dict | None = None  # None: the flavor's own error JSON for the status
    headers: dict[str, str] = field(default_factory=dict)


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


class FakeOpenAI(FakeModelServer):
    def __init__(
        self,
        flavor: Flavor = "vllm",
        models: tuple[str, ...] = ("HuggingFaceTB/SmolVLM-256M-Instruct",),
        max_model_len: int = 2048,
        image_tokens: int = 64,
        api_key: str | None = None,
        payload_limit: int | None = None,
    ):
        self.flavor = flavor
        self.models = list(models)
        self.max_model_len = max_model_len
        self.image_tokens = image_tokens
        self.api_key = api_key
        self.payload_limit = payload_limit  # a proxy in front with this body limit (nginx: 1 MB)
        self.replies: deque[Reply] = deque()
        self.default_reply = Reply(["A", " red", " square", "."])
        self.failures: deque[Failure] = deque()
        self.prompt_logprob: Callable[[str], float] = lambda text: -1.0
        self.chat_requests: list[dict] = []
        self.chat_headers: list[dict[str, str]] = []
        self.tokenize_requests: list[dict] = []
        self.body_sizes: list[int] = []  # of every chat completion request, refused ones too
        self.disconnects = 0
        self.streaming = 0
        routes = {"/v1/models": self._models, "/v1/chat/completions": self._chat}
        if flavor == "vllm":
            routes["/tokenize"] = self._tokenize
        if flavor == "llamacpp":
            routes |= {"/tokenize": self._tokenize, "/health": self._health, "/props": self._props}
        super().__init__(routes)

    @property
    def url(self) -> str:
        """The /v1 base, as [model] url takes it."""
        return self.server.url("/v1")

    # -- errors, as each server shapes them ---------------------------------------------------

    def _error(self, status: int, message: str, kind: str = "BadRequestError", code: str | None = None, headers: dict | None = None) -> web.Response:
        if self.flavor == "llamacpp":
            body: dict = {"error": {"code": status, "message": message, "type": code or "invalid_request_error"}}
        else:
            body = {"error": {"message": message, "type": kind, "param": None, "code": code or status}}
        return web.json_response(body, status=status, headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        header = request.headers.get("Authorization", "")
        if self.flavor == "ollama":
            return header.startswith("Bearer ")  # Ollama wants one, whatever it says
        return header == f"Bearer {self.api_key}"

    def _refused(self) -> web.Response:
        if self.flavor == "vllm":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return self._error(401, "Invalid API Key", "authentication_error", "invalid_api_key")

    # -- routes ------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _props(self, request: web.Request) -> web.Response:
        return web.json_response({"default_generation_settings": {"n_ctx": self.max_model_len}, "total_slots": 1, "model_path": self.models[0]})

    async def _models(self, request: web.Request) -> web.Response:
        if self.flavor != "llamacpp" and not self._authorized(request):
            return self._refused()  # llama.cpp leaves /v1/models open
        data = []
        for model in self.models:
            entry: dict = {"id": model, "object": "model", "created": 1733500000, "owned_by": "vllm" if self.flavor == "vllm" else "library"}
            if self.flavor == "vllm":
                entry |= {"root": model, "parent": None, "max_model_len": self.max_model_len, "permission": []}
            if self.flavor == "llamacpp":
                entry["meta"] = {"n_ctx_train": 8192, "n_vocab": 49280}
            data.append(entry)
        return web.json_response({"object": "list", "data": data})

    async def _json(self, request: web.Request) -> dict | web.Response:
        raw = await request.content.read()  # no limit of aiohttp's own: vLLM and llama.cpp have none
        if request.path.endswith("/chat/completions"):
            await self._record(lambda: self.body_sizes.append(len(raw)))
        if self.payload_limit is not None and len(raw) > self.payload_limit:
            html = "<html><head><title>413 Request Entity Too Large</title></head><body><center><h1>413 Request Entity Too Large</h1></center></body></html>"
            return web.Response(status=413, text=html, content_type="text/html")
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "Expecting value: line 1 column 1 (char 0)")
        return body if isinstance(body, dict) else self._error(400, "The body must be a JSON object")

    async def _tokenize(self, request: web.Request) -> web.Response:
        if self.flavor == "vllm" and not self._authorized(request):
            return self._refused()
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        await self._record(lambda: self.tokenize_requests.append(body))
        if self.flavor == "llamacpp":
            return web.json_response({"tokens": [100 + len(piece) for piece in tokenize(str(body.get("content", "")))]})
        if "messages" in body:
            problem = self._check_messages(body["messages"], record=False)
            if problem:
                return self._error(400, problem)
            pieces = self._template(body["messages"], body.get("add_generation_prompt", True), body.get("continue_final_message", False))
        else:
            pieces = tokenize(str(body.get("prompt", "")))
        ids = [self._id(piece) for piece in pieces]
        return web.json_response({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": None})

    @staticmethod
    def _id(piece: str) -> int:
        return 100 + sum(piece.encode()) % 49000

    def _check_messages(self, messages: object, record: bool = True) -> str | None:
        """What is wrong with `messages`, if anything; their images are decoded (and, with `record`, kept in `images_seen`)."""
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list"
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                return f"invalid message: {str(message)[:60]}"
            content = message.get("content")
            if isinstance(content, str):
                continue
            if not isinstance(content, list):
                return "content must be a string or a list of parts"
            for part in content:
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    continue
                if part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):  # OpenAI wants the object form
                    problem = self._decode_image(str(part["image_url"].get("url", "")), record)
                    if problem:
                        return problem
                    continue
                return f"invalid content part: {str(part)[:60]}"
        return None

    def _decode_image(self, url: str, record: bool) -> str | None:
        if not url.startswith("data:"):
            return "image URLs must be data: URIs" if self.flavor == "ollama" else "the fake never fetches links"
        return self._data_image(url, record)

    def _template(self, messages: list, add_generation_prompt: bool, continue_final_message: bool = False) -> list[str]:
        """The toy chat template's tokens: `<|role|>`, the text's pieces and the images' tokens, `<|end|>`."""
        pieces: list[str] = []
        for at, message in enumerate(messages):
            pieces.append(f"<|{message['role']}|>")
            content = message["content"]
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                pieces += tokenize(part["text"]) if part["type"] == "text" else ["<image>"] * self.image_tokens
            if not (continue_final_message and at == len(messages) - 1):
                pieces.append("<|end|>")
        if add_generation_prompt:
            pieces.append("<|assistant|>")
        return pieces

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._refused()
        body = await self._json(request)
        if isinstance(body, web.Response):
            return body
        await self._record(lambda: (self.chat_requests.append(body), self.chat_headers.append(dict(request.headers))))
        if self.failures:
            failure = self.failures.popleft()
            if failure.body is None:
                return self._error(failure.status, "The server is overloaded", "ServiceUnavailableError", headers=failure.headers)
            if isinstance(failure.body, dict):
                return web.json_response(failure.body, status=failure.status, headers=failure.headers)
            return web.Response(status=failure.status, text=failure.body, content_type="text/html", headers=failure.headers)
        if body.get("model") not in self.models:
            return self._error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        problem = self._check_messages(body.get("messages"))
        if problem:
            return self._error(400, problem)
        if len(body.get("stop") or []) > 4:
            return self._error(400, "stop: at most 4 stop sequences")
        continuing = bool(body.get("continue_final_message"))
        prompt = self._template(body["messages"], body.get("add_generation_prompt", not continuing), continuing)
        max_tokens = int(body.get("max_tokens") or 16)
        if len(prompt) + max_tokens > self.max_model_len and self.flavor != "ollama":
            if self.flavor == "llamacpp":
                return self._error(
                    400,
                    f"request ({len(prompt)} tokens) exceeds the available context size ({self.max_model_len} tokens), try increasing it",
                    code="exceed_context_size_error",
                )
            return self._error(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested {len(prompt) + max_tokens} tokens "
                f"({len(prompt)} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
            )
        reply = self.replies.popleft() if self.replies else self.default_reply
        if body.get("prompt_logprobs") is not None and self.flavor == "vllm":
            return web.json_response(self._completion(body, ["x"], "length", len(prompt)) | {"prompt_logprobs": self._prompt_logprobs(prompt)})
        if not body.get("stream"):
            pieces, reason = self._generate(reply.pieces, body.get("stop") or [], max_tokens)
            return web.json_response(self._completion(body, pieces, reason, len(prompt)))
        return await self._stream(request, body, reply, len(prompt), max_tokens)

    def _prompt_logprobs(self, prompt: list[str]) -> list:
        return [None] + [{str(self._id(piece)): {"logprob": self.prompt_logprob(piece), "rank": 1, "decoded_token": piece}} for piece in prompt[1:]]

    @staticmethod
    def _generate(pieces: list[str], stops: list[str], max_tokens: int) -> tuple[list[str], str]:
        """The pieces the model writes within `max_tokens`, cut before a stop string, and why it ended."""
        text = ""
        for count, piece in enumerate(pieces, start=1):
            text += piece
            for stop in stops:
                if stop in text:
                    return [text[: text.index(stop)]], "stop"
            if count == max_tokens:
                return pieces[:count], "length"
        return pieces, "stop"

    def _completion(self, body: dict, pieces: list[str], reason: str, prompt_tokens: int) -> dict:
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1733500000,
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "finish_reason": reason, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces), "total_tokens": prompt_tokens + len(pieces)},
        }

    async def _stream(self, request: web.Request, body: dict, reply: Reply, prompt_tokens: int, max_tokens: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        await self._record(lambda: setattr(self, "streaming", self.streaming + 1))
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1733500000, "model": body["model"], "system_fingerprint": "fp_fake"}

        async def send(choices: list, **extra) -> None:
            chunk = {**base, "choices": choices, **extra}
            if self.flavor == "llamacpp":
                chunk["timings"] = {"prompt_n": prompt_tokens, "predicted_n": 1}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        try:
            await response.write(b": ping\n\n")
            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            stops = body.get("stop") or []
            text, sent, count, reason = "", "", 0, "stop"
            for index, piece in enumerate(reply.pieces):
                if reply.cut_after is not None and index >= reply.cut_after:
                    request.transport.close()  # the connection drops in the middle of the answer
                    return response
                if reply.malformed_after is not None and index >= reply.malformed_after:
                    await response.write(b'data: {"choices": [{"delta": {"content": "tru\n\n')
                    break
                if reply.error_after is not None and index >= reply.error_after:
                    await response.write(f"data: {json.dumps({'error': reply.error})}\n\n".encode())
                    break
                if reply.hold_after is not None and index >= reply.hold_after:
                    await (reply.gate or self.release).wait()
                text += piece
                count += 1
                stopped = next((stop for stop in stops if stop in text), None)
                visible = text[: text.index(stopped)] if stopped else text
                # Servers hold back what may still become a stop string.
                held = max((n for stop in stops for n in range(1, len(stop)) if visible.endswith(stop[:n])), default=0) if not stopped else 0
                delta = visible[len(sent) : len(visible) - held]
                last = stopped is not None or count == max_tokens or index == len(reply.pieces) - 1
                if last:
                    delta = visible[len(sent) :]
                    reason = "length" if count == max_tokens and not stopped else "stop"
                if delta or last:
                    await send([{"index": 0, "delta": {"content": delta} if delta else {}, "logprobs": None, "finish_reason": reason if last else None}])
                    sent += delta
                if index % 2:
                    await response.write(b": keep-alive\n\n")
                if last:
                    break
            else:
                await send([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
            if (body.get("stream_options") or {}).get("include_usage"):
                await send([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": count, "total_tokens": prompt_tokens + count})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except asyncio.CancelledError:  # the client hung up
            await self._record(lambda: setattr(self, "disconnects", self.disconnects + 1))
            raise
        finally:
            await self._record(lambda: setattr(self, "streaming", self.streaming - 1))
