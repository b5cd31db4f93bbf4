"""The in-process IDEFICS backend: a queue, and one worker thread that runs the running batch.

What differs between the model families (IDEFICS v1, Idefics3/SmolVLM) is the `Family` object's
(model/family.py): prompts, images, and what the batch's rows carry of them; the scheduling here is
the same for all.

Iteration-level scheduling: there is one running batch (`model.batch.Batch`). Before every decoding
step the worker takes the requests waiting in the queue that fit (the `max_batch_tokens` budget of
cache rows x tokens, and at most `max_batch_size` rows), prefills them and merges them in; after every
step, rows that ended (an end token, a stop string, their own max_new_tokens, their asker gone or
out of time) leave at once. Nobody waits for somebody else's long answer: greedy, sampled and
beam-search requests (one row per beam, `model.beams`) share the batch, and label scoring is a
prefill-only request run between two steps (`model.scoring`). While the batch decodes, a newcomer's
prompt is processed (template, tokens, the image processor) in the prompt process
(`model.prompt_process`), so that the batch pauses only for its vision encoder and prefill. A newcomer whose prefill runs out of
memory while others decode waits in front of the queue, under a lowered budget, for room. The event
loop never runs the model: events go back through a `_Courier`, which has the loop take text every
`stream_interval_s` instead of waking it for every token (each wake-up hands the loop the GIL, which
the worker then waits to get back), and a watchdog on the loop replaces a worker that stops making progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
from transformers import LogitsProcessor

from ground.images import ModelImage
from model.batch import Batch, Prompt, Row, Sampling, footprint
from model.beams import BeamSearch, beam_reply
from model.families import family_for
from model.family import Family, ImageEvicted, ProcessedPrompt
from model.image_cache import ImageCache
from model.loading import CheckpointSettings, load_checkpoint
from model.prompt_process import PromptProcess
from model.scoring import ProcessedScoring, score_continuations, score_processed
from model.service import (
    SPECIAL_TOKENS,
    Chat,
    Finished,
    GenerationFailed,
    GenerationRequest,
    ModelBusy,
    ModelError,
    ModelInfo,
    ModelService,
    ModelTimeout,
    ModelUnavailable,
    Part,
    Queued,
    ScoreRequest,
    Started,
    StreamEvent,
    TextDelta,
)
from model.streamer import ReplyStream

log = logging.getLogger(__name__)

T = TypeVar("T")


def _could_not_answer(out_of_memory: bool = False) -> GenerationFailed:
    """What the asker of a request the model could not answer is told."""
    detail = "it ran out of memory" if out_of_memory else "it hit an internal error"
    return GenerationFailed(f"Sorry, the model could not answer this one ({detail}). Please try again.")


# Makes a row's own transformers LogitsProcessor from its prompt's token ids (a hook for tests and
# experiments); it is then called at each step with the row's tokens so far, as in a solo `generate`.
RowProcessorFactory = Callable[[list[int]], LogitsProcessor]


@dataclass(frozen=True)
class BatchSettings:
    """How requests share the model: rows, cache budget, queue, recovery, the watchdog, threads."""

    # A ceiling on rows, high enough that the token budget below, i.e. memory, is what limits the batch.
    max_batch_size: int = 64
    # Rows x tokens of KV cache the running batch may need at most (every row padded to the longest
    # prompt + reply); an out-of-memory error lowers it for a while. 8 rows x 2,048 tokens by default
    # (or 40 rows of ~400); size it to the GPU memory left after the weights (README, "Sizing the batch").
    max_batch_tokens: int = 16384
    max_queue: int = 64
    # After an out-of-memory error the budget is halved; this many answered requests later it doubles back.
    recover_after: int = 16
    # A batch that makes no progress (no new token) for this long is declared stuck: its requests
    # are answered with an error and a fresh worker thread takes over.
    stall_timeout_s: float = 120.0
    # torch.set_num_threads for the process; None leaves torch's own choice.
    threads: int | None = None
    # New text reaches the askers at most this often (Started, Finished and errors go at once). Every
    # hand-over wakes the event loop and passes it the GIL, and the decoding worker then waits to get
    # it back: per token, that is most of a small model's step on a busy CPU. Chat platforms show
    # edits a second apart at best; 0 sends every token at once.
    stream_interval_s: float = 0.02
    # Bytes of encoded images kept between requests, so that a photo asked about again (every turn of
    # a conversation sends its history) skips the image processor and vision encoder; least recently
    # used first out, 0 keeps none. They live beside the model, in its dtype. One image: IDEFICS v1's
    # 64 perceiver latents x 1,280 in 16 bits, 160 KB; a 640 x 480 photo on Idefics3-8B, 13 tiles x 169
    # x 4,096 in 16 bits, 18 MB; on SmolVLM-256M, 13 x 64 x 576 in fp32, 1.9 MB. So 256 MB holds the
    # photos of many conversations at once (1,600 / 14 / 130 of those), a small part of a GPU's memory
    # beside the KV cache (about 8 GB by default for the 9B model).
    image_cache_bytes: int = 256 * 2**20
    # Prompts with new images, and scorings, are processed (template, tokens, the image processor's
    # pixels) in a process of their own while the batch decodes (model/prompt_process.py), and on a
    # CPU with cores `threads` leaves free their images encoded there too; False: on the model's
    # worker, between two steps.
    prompt_process: bool = True


class _Courier:
    """Carries events from the worker thread to the askers' queues on the event loop, a batch at a
    time. Events other than text call the loop at once; the first text after a delivery sets a timer
    on the loop, which takes whatever text has come by then, however busy the worker is."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float):
        self._loop = loop
        self._interval = interval
        self._lock = threading.Lock()
        self._parcels: list[tuple[asyncio.Queue, StreamEvent | BaseException]] = []
        self._timed = False  # the loop has (or will have) a timer for the text
        self._called = False  # the loop will deliver at its next turn

    def send(self, events: asyncio.Queue, event: StreamEvent | BaseException) -> None:
        """Put `event` into `events` on the loop: now, or within `interval` if it is text."""
        text = isinstance(event, TextDelta)
        with self._lock:
            self._parcels.append((events, event))
            if text:
                on_its_way, self._timed = self._timed or self._called, True
            else:
                on_its_way, self._called = self._called, True
        if on_its_way:
            return
        if text:
            self._loop.call_soon_threadsafe(self._loop.call_later, self._interval, self._deliver)
        else:
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            parcels, self._parcels = self._parcels, []
            self._timed = self._called = False
        for events, event in parcels:
            events.put_nowait(event)


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    courier: _Courier
    enqueued: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set on the loop: the worker drops the row at its next step
    started: bool = False
    # The prompt through the prompt process (None: the worker processes it); dropped once encoded.
    processed: ProcessedPrompt | None = None
    # The prompt, encoded by the worker: one row, or one per beam; kept if put back in the queue.
    rows: list[Row] = field(default_factory=list)
    reply: ReplyStream | None = None  # a streamed reply's text so far (a beam search's arrives whole)
    answered: bool = False

    def emit(self, event: StreamEvent | BaseException) -> None:
        """Hand an event to the asker; safe from the worker thread."""
        self.courier.send(self.events, event)

    @property
    def open(self) -> bool:
        return not self.cancelled and not self.answered and not (self.reply is not None and self.reply.finished)


class LocalBackend(ModelService):
    """IDEFICS loaded with transformers in this process, one running batch for all conversations.
    Made ready by `await LocalBackend.open(checkpoint, batching)`."""

    def __init__(
        self,
        checkpoint: CheckpointSettings | None = None,
        batching: BatchSettings | None = None,
        row_processors: Sequence[RowProcessorFactory] = (),
    ):
        """`row_processors` give each request's row its own transformers `LogitsProcessor`s: a hook for
        experiments and for tests that force tokens."""
        self.checkpoint = checkpoint or CheckpointSettings()
        self.batching = batching or BatchSettings()
        self.row_processors = list(row_processors)
        self.info = ModelInfo(name=self.checkpoint.checkpoint)
        self._pending: deque[_Job] = deque()
        self._between: deque[tuple[Callable[[Any, Any], Any], Future]] = deque()  # work for the worker between steps
        self._lock = threading.Condition()  # guards _pending between the loop and the worker
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idefics-generate")
        self._watchdog: asyncio.Task | None = None
        self._worker = 0  # the current worker's number; an abandoned worker sees it change and leaves
        self._active: list[_Job] = []  # the worker's rows (running and joining)
        self._token_budget = self.batching.max_batch_tokens
        self._answered_since_oom = 0
        self._last_progress = time.monotonic()  # written by the worker at every forward
        self._closed = False
        self.prompt_process: PromptProcess | None = None  # started by `open`, if the settings ask for it
        self.batch_sizes: list[int] = []  # rows decoding together after every merge; for tests and benchmarks

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        checkpoint: CheckpointSettings | None = None,
        batching: BatchSettings | None = None,
        row_processors: Sequence[RowProcessorFactory] = (),
    ) -> LocalBackend:
        """A backend with the checkpoint loaded (off the event loop), ready for requests; raises
        `ModelLoadError` with a readable message when the checkpoint can't be loaded."""
        backend = cls(checkpoint, batching, row_processors)
        try:
            await backend._load()
        except BaseException:
            backend._executor.shutdown(wait=False)
            raise
        return backend

    async def _load(self) -> None:
        if self.batching.threads is not None:
            torch.set_num_threads(self.batching.threads)
        self._loop = asyncio.get_running_loop()
        self._model, self._processor = await self._loop.run_in_executor(self._executor, load_checkpoint, self.checkpoint)
        tokenizer = self._processor.tokenizer
        self._tokenizer = tokenizer
        self.family: Family = family_for(self._processor, self._model.config, ImageCache(self.batching.image_cache_bytes))
        self._end_ids = self.family.end_ids
        self._banned = self.family.banned_ids
        # Byte-fallback tokens (Llama's <0x..>); byte-level tokenizers (SmolVLM's) have none.
        byte_ids = tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in range(256)])
        self._byte_ids = frozenset(byte_ids) - {tokenizer.unk_token_id, None}
        self.info = ModelInfo(
            name=self.checkpoint.checkpoint,
            context_tokens=self.family.context_tokens,
            family=self.family.name,
            special_tokens=tuple(token for token in self.family.special_tokens if token not in SPECIAL_TOKENS),
            **self.family.image_preparation(),
        )
        self._courier = _Courier(self._loop, self.batching.stream_interval_s)
        if self.batching.prompt_process:
            self.prompt_process = await PromptProcess.open(self.family, *self._vision_apart())
        self._watchdog = asyncio.create_task(self._watch(), name="idefics-watchdog")

    def _vision_apart(self) -> tuple[torch.nn.Module | None, int]:
        """The vision part for the prompt process to run too, and its threads: those of a model on
        the CPU (not quantized: its weights copy as they are) with cores its worker's torch threads
        leave free. None: the worker encodes images."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        spare, model = cores - torch.get_num_threads(), self._model
        if model.device.type != "cpu" or getattr(model, "hf_quantizer", None) is not None or spare < 1:
            return None, 1
        return self.family.vision(model), spare

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.prompt_process is not None:
            self.prompt_process.close()
        gone = ModelUnavailable("The bot is shutting down; your request was not answered.")
        with self._lock:
            waiting = list(self._pending)
            self._pending.clear()
            between = [done for _, done in self._between]
            self._between.clear()
            self._lock.notify_all()
        for done in between:
            if done.set_running_or_notify_cancel():
                done.set_exception(gone)
        for job in [*waiting, *self._active]:
            if job.open:
                job.cancelled = True
                job.emit(gone)
        # The worker leaves at its next step; a stuck one is left behind.
        ended = asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)
        await asyncio.wait({ended}, timeout=self.batching.stall_timeout_s)
        self._executor.shutdown(wait=False)

    # -- the interface -----------------------------------------------------------------------

    def health(self) -> dict[str, bool]:
        return {
            "loaded": hasattr(self, "_model") and not self._closed,
            "worker_alive": self._watchdog is not None and not self._watchdog.done() and not self._stalled(),
        }

    def render(self, prompt: Chat) -> list[Part]:
        return self.family.render(prompt)

    async def count_tokens(self, prompt: Chat) -> int:
        return self.family.count_tokens(prompt)

    async def score(self, request: ScoreRequest) -> list[float]:
        # A prefill-only request: processed in the prompt process (the template, every continuation's
        # tokens, the image's pixels), then, between two steps of the running batch, the image
        # encoded once and all continuations in one forward pass (the pause of one newcomer's prefill).
        try:
            async with asyncio.timeout(request.time_limit):
                processed, apart = None, self._apart()
                if apart is not None:
                    processed = await apart.process_scoring(request.prompt, request.continuations, self.family.cached_images(request.prompt))
                return await self.call_between_steps(partial(self._weigh, request, processed))
        except TimeoutError:
            raise ModelTimeout.scoring(request) from None
        except ModelError:
            raise
        except Exception as exc:
            log.exception("request.failed", extra={"request": request.label})
            raise _could_not_answer(_is_out_of_memory(exc)) from None

    def _weigh(self, request: ScoreRequest, processed: ProcessedScoring | None, model, processor) -> list[float]:
        """`request`'s scores, on the worker: from what the prompt process made of it, unless an
        image it took as cached has left the cache since (or it made nothing)."""
        options: dict[str, Any] = {"end_ids": self._end_ids, "row_processors": self.row_processors}
        if processed is not None:
            with contextlib.suppress(ImageEvicted):
                return score_processed(model, self.family, processed, **options)
        return score_continuations(model, self.family, request.prompt, request.continuations, **options)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[StreamEvent, None]:
        self._check_room()
        job = self._submit(request, await self._processed_apart(request))
        loop = job.loop
        deadline = None if request.queue_timeout is None else loop.time() + request.queue_timeout
        started = False
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await job.events.get()
                except TimeoutError:
                    raise ModelTimeout.after(request, started) from None
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Started):
                    started = True
                    deadline = None if request.timeout is None else loop.time() + request.timeout
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self._cancel(job)

    async def call_between_steps(self, work: Callable[[Any, Any], T]) -> T:
        """Run `work(model, processor)` on the worker thread between two decoding steps and return its
        result: for one-off forwards that are not a streamed reply (scoring labels, say). The running
        batch pauses while it runs, so keep it to a forward or two; it runs in inference mode, with
        the processor to itself."""
        if self._closed or self._watchdog is None:
            raise ModelUnavailable("The model is not running right now; please try again shortly.")
        done: Future = Future()
        with self._lock:
            self._between.append((work, done))
            self._lock.notify()
        return await asyncio.wrap_future(done)

    def _apart(self) -> PromptProcess | None:
        """The prompt process, if a newcomer should be processed there now: while the batch decodes
        others' replies, which would otherwise pause for it, and the process is free. Otherwise the
        worker is quicker: no trip there and back, newcomers that arrive together are processed and
        prefilled together, and a burst is not processed one by one in a queue of its own."""
        process = self.prompt_process
        return process if process is not None and process.idle and any(job.open for job in self._active) else None

    async def _processed_apart(self, request: GenerationRequest) -> ProcessedPrompt | None:
        """The prompt through the prompt process, if the batch is decoding and the prompt has images
        to process (text alone costs the worker less than the trip); None: the worker processes it."""
        chat, apart = request.prompt, self._apart()
        cached = self.family.cached_images(chat)
        if apart is None or all(not isinstance(image, ModelImage) or image.digest in cached for image in chat.images):
            return None
        try:
            async with asyncio.timeout(request.queue_timeout):
                return await apart.process(chat, cached)
        except TimeoutError:
            raise ModelTimeout.after(request, False) from None
        except Exception:
            log.exception("request.failed", extra={"request": request.label})
            raise _could_not_answer() from None

    # -- the queue (event loop side) ---------------------------------------------------------

    def _check_room(self) -> None:
        """Refuse a request the queue can't take now."""
        if self._closed or self._watchdog is None:
            raise ModelUnavailable("The model is not running right now; please try again shortly.")
        if len(self._pending) >= self.batching.max_queue:
            raise ModelBusy("I'm busy with other requests right now; please try again in a moment.")

    def _submit(self, request: GenerationRequest, processed: ProcessedPrompt | None) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, courier=self._courier, enqueued=loop.time(), processed=processed)
        with self._lock:
            self._check_room()
            self._pending.append(job)
            position = len(self._pending)
            self._lock.notify()
        job.events.put_nowait(Queued(position=position))
        return job

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        with self._lock:
            if job not in self._pending:
                return
            self._pending.remove(job)
        self._announce_positions()

    def _announce_positions(self) -> None:
        """Tell every waiting request its place; rows put back in the queue (already started) count
        in front of them, though they hear nothing themselves."""
        with self._lock:
            waiting = list(self._pending)
        for position, job in enumerate(waiting, start=1):
            if not job.started:
                job.events.put_nowait(Queued(position=position))

    # -- the watchdog (event loop side) -------------------------------------------------------

    def _stalled(self) -> bool:
        return bool(self._active) and time.monotonic() - self._last_progress > self.batching.stall_timeout_s

    async def _watch(self) -> None:
        """Run the worker; if it stops making progress, answer its requests and start a fresh one
        (a thread stuck in native code can't be killed, only abandoned)."""
        check_every = min(1.0, self.batching.stall_timeout_s / 4)
        while not self._closed:
            worker = self._worker
            work = asyncio.get_running_loop().run_in_executor(self._executor, self._serve, worker)
            while True:
                done, _ = await asyncio.wait({work}, timeout=check_every)
                if done:
                    if work.exception() is not None:  # a bug, not a request: nobody else is told
                        log.error("worker.crashed", exc_info=work.exception())
                    reason = "Sorry, something went wrong while answering. Please try again."
                    break
                if self._stalled():
                    log.error("worker.stuck", extra={"size": len(self._active), "stalled_s": round(time.monotonic() - self._last_progress, 1)})
                    reason = "Sorry, the model stopped responding, so I gave up on this request. Please try again."
                    self._executor.shutdown(wait=False)
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idefics-generate")
                    break
            with self._lock:
                self._worker = worker + 1
                abandoned, self._active = self._active, []
                self._lock.notify_all()
            self._fail(abandoned, GenerationFailed(reason))

    @staticmethod
    def _fail(jobs: Sequence[_Job], error: Exception) -> None:
        for job in jobs:
            if job.open:
                job.cancelled = True
                job.emit(error)

    # -- the worker thread -------------------------------------------------------------------

    def _serve(self, worker: int) -> None:
        """The worker's loop: take in newcomers, step the running batch, until closed or replaced."""

        batch: Batch | None = None
        with torch.inference_mode():
            while True:
                joining = self._take_newcomers(batch, worker)
                if joining is None:
                    return
                self._run_between_steps()
                if joining:
                    batch = self._join(batch, joining)
                if batch is not None:
                    batch = self._step(batch)
                self._active = [] if batch is None else [row.owner for row in batch.rows]

    def _take_newcomers(self, batch: Batch | None, worker: int) -> list[Row] | None:
        """The waiting requests that fit in the batch now, encoded (None: this worker should stop).
        While nothing runs, waits for a request."""
        rows = [] if batch is None else list(batch.rows)
        joining: list[Row] = []
        while True:
            with self._lock:
                while not rows and not joining and not self._pending and not self._between and self._worker == worker and not self._closed:
                    self._lock.wait()
                    self._last_progress = time.monotonic()  # idle time is not a stall
                if self._worker != worker or self._closed:
                    return None
                if not self._pending or len(rows) + len(joining) >= self.batching.max_batch_size:
                    break
                job = self._pending[0]
            if not job.rows and not self._encode(job):
                continue
            with self._lock:
                if not self._pending or self._pending[0] is not job:
                    continue  # cancelled while it was being encoded
                together = [*rows, *joining, *job.rows]
                if rows + joining and footprint(together) > self._token_budget:
                    break
                self._pending.popleft()
            joining.extend(job.rows)
            self._active = [*self._active, job]  # before Started: from then on the loop sees it decoding
            if not job.started:
                job.started = True
                job.emit(Started(batch_size=len(together)))
        if joining:
            self._loop.call_soon_threadsafe(self._announce_positions)
        return joining

    def _run_between_steps(self) -> None:
        while self._between:
            with self._lock:
                work, done = self._between.popleft()
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(work(self._model, self._processor))
                except Exception as exc:  # the caller gets it; the batch goes on
                    done.set_exception(exc)
            self._last_progress = time.monotonic()

    def _encode(self, job: _Job) -> bool:
        """Tokenize `job`'s prompt and run its images through the vision encoder; a bad prompt fails alone."""
        try:
            prompt = self._prepare(job)
        except Exception:
            log.exception("request.failed", extra={"request": job.request.label})
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
            self._loop.call_soon_threadsafe(self._announce_positions)
            self._fail([job], _could_not_answer())
            return False
        params = job.request.params
        processors = [make(prompt.ids) for make in self.row_processors]
        if params.num_beams > 1:
            search = BeamSearch(
                prompt.ids,
                params.num_beams,
                params.max_new_tokens,
                end_ids=self._end_ids,
                banned_ids=self._banned,
                repetition_penalty=params.repetition_penalty,
                processors=processors,
            )
            search.rows = [Row(owner=job, prompt=prompt, max_new_tokens=params.max_new_tokens, beams=search) for _ in range(params.num_beams)]
            job.rows = list(search.rows)
            return True
        sampling = Sampling(params.do_sample, params.temperature, params.top_p, params.repetition_penalty, params.seed)
        job.rows = [Row(owner=job, prompt=prompt, max_new_tokens=params.max_new_tokens, sampling=sampling, processors=processors)]
        job.reply = ReplyStream(job.emit, self._decode, self._end_ids, params.max_new_tokens, job.request.stop_strings, self._byte_ids)
        return True

    def _prepare(self, job: _Job) -> Prompt:
        """`job`'s prompt encoded: from what the prompt process made of it, unless an image it took
        as cached has left the cache since (or it made nothing), else processed here."""
        processed, job.processed = job.processed, None
        if processed is not None:
            with contextlib.suppress(ImageEvicted):
                return self.family.encode(self._model, processed)
        return self.family.prepare(self._model, job.request.prompt)

    def _join(self, batch: Batch | None, rows: list[Row]) -> Batch | None:
        """Prefill `rows`, give each its first token, and merge those still going into `batch`."""
        joined: Batch | None = self._isolating(rows, self._prefill, batch)
        if joined is not None:
            joined = self._advance(joined)
        parts = [part for part in (batch, joined) if part is not None]
        if not parts:
            return None
        merged = Batch.concatenate(parts)
        self.batch_sizes.append(len(merged))
        return merged

    def _prefill(self, rows: list[Row]) -> Batch:
        return Batch.prefill(self._model, rows, self.family, self._tokenizer.pad_token_id)

    def _step(self, batch: Batch) -> Batch | None:
        """Drop rows nobody waits for, decode one token for the rest, and drop the rows that ended."""
        listened = self._keep(batch, [index for index, row in enumerate(batch.rows) if row.owner.open])
        if listened is None:
            return None

        def decode(part: Batch) -> Batch:
            part.decode(self._model)
            return part

        stepped = self._isolating(listened, decode)
        return None if stepped is None else self._advance(stepped)

    def _advance(self, batch: Batch) -> Batch | None:
        """Choose every row's next token, stream it, and keep the rows that go on."""
        self._last_progress = time.monotonic()
        tokens, failed = batch.choose(self._banned)
        keep = []
        for index, (row, token) in enumerate(zip(batch.rows, tokens)):
            job = row.owner
            if index in failed:
                log.error("request.failed", exc_info=failed[index], extra={"request": job.request.label})
                self._fail([job], _could_not_answer())
            elif not job.open:
                continue
            elif row.beams is not None:
                if not row.beams.done:
                    keep.append(index)
                elif row is row.beams.rows[0]:
                    self._answer_beams(job, row.beams)
            elif job.reply.push(token):
                self._answered()
            else:
                keep.append(index)
        return self._keep(batch, keep)

    def _answer_beams(self, job: _Job, search: BeamSearch) -> None:
        finished = beam_reply(search, self._decode, self._end_ids, job.request.stop_strings)
        job.answered = True
        if finished.text:
            job.emit(TextDelta(finished.text))
        job.emit(finished)
        self._answered()

    @staticmethod
    def _keep(batch: Batch, keep: list[int]) -> Batch | None:
        if not keep:
            return None
        return batch if len(keep) == len(batch) else batch.select(keep)

    def _isolating(self, work: Batch | list[Row], run: Callable, running: Batch | None = None) -> Batch | None:
        """`run(work)` (a prefill of rows, or a decoding step of a batch), so that a request that makes
        the model raise fails alone: on an error the work is split in halves until the failing
        request is alone; the halves that succeed come back merged. Out of memory lowers the token
        budget and puts rows back into the queue instead (see `_out_of_memory`); `running` is the
        batch that decodes on while newcomers are prefilled."""
        rows = work.rows if isinstance(work, Batch) else work
        try:
            return run(work)
        except Exception as exc:
            if _is_out_of_memory(exc):
                return self._out_of_memory(work, rows, run, running)
            if _one_request(rows):
                job = rows[0].owner
                log.exception("request.failed", extra={"request": job.request.label})
                self._fail([job], _could_not_answer())
                return None
            log.warning("batch.split", extra={"size": len(rows), "error": type(exc).__name__})
            halves = work.split() if isinstance(work, Batch) else (work[: len(work) // 2], work[len(work) // 2 :])
            done = [part for part in (self._isolating(half, run, running) for half in halves) if part is not None]
            return Batch.concatenate(done) if done else None

    def _out_of_memory(self, work: Batch | list[Row], rows: list[Row], run: Callable, running: Batch | None) -> Batch | None:
        """Lower the budget below what failed. Newcomers whose prefill failed while others decode wait
        in front of the queue until rows leave and make room. Otherwise the rows beyond the budget wait
        in the queue (keeping what they have said) and the rest is tried again; a request that does
        not fit alone fails."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        waiting_for_room = running is not None and not isinstance(work, Batch)
        if _one_request(rows) and not waiting_for_room:
            job = rows[0].owner
            log.error("request.out_of_memory", extra={"request": job.request.label, "tokens": footprint(rows)})
            self._fail([job], _could_not_answer(out_of_memory=True))
            return None
        everything = [*running.rows, *rows] if waiting_for_room and running is not None else rows
        self._token_budget = max(1, min(self._token_budget, footprint(everything)) // 2)
        self._answered_since_oom = 0
        log.warning("batch.budget_lowered", extra={"tokens": self._token_budget, "rows": len(everything)})
        fit = 0
        if not waiting_for_room:
            fit = 1
            while fit < len(rows) and footprint(rows[: fit + 1]) <= self._token_budget:
                fit += 1
            while fit < len(rows) and rows[fit].owner is rows[fit - 1].owner:  # a request's beams stay together
                fit += 1
        self._put_back(rows[fit:])
        if fit == 0:
            return None
        kept = work.select(range(fit)) if isinstance(work, Batch) else work[:fit]
        return self._isolating(kept, run, running)

    def _put_back(self, rows: list[Row]) -> None:
        """Rows back to the front of the queue, in their order: they continue from what they have said
        when they fit again."""
        with self._lock:
            self._pending.extendleft(reversed(dict.fromkeys(row.owner for row in rows)))
        self._loop.call_soon_threadsafe(self._announce_positions)
        for row in rows:
            row.cached = 0  # it will be prefilled again with its reply so far

    def _answered(self) -> None:
        if self._token_budget >= self.batching.max_batch_tokens:
            return
        self._answered_since_oom += 1
        if self._answered_since_oom >= self.batching.recover_after:
            self._token_budget = min(self.batching.max_batch_tokens, self._token_budget * 2)
            self._answered_since_oom = 0
            log.info("batch.budget_raised", extra={"tokens": self._token_budget})

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


def _one_request(rows: Sequence[Row]) -> bool:
    """Whether `rows` are all one request's (one row, or the beams of one search)."""
    return all(row.owner is rows[0].owner for row in rows)


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
