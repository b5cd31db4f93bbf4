"""The in-process IDEFICS backend: a queue, a batcher, and one worker thread that runs `generate`.

Requests that arrive within `max_wait_ms` of each other (and share decoding settings) go into one
`generate` call of up to `max_batch_size` rows. The event loop never runs the model: batches run on a
single worker thread and stream their tokens back through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model.loading import CheckpointSettings, load_checkpoint
from model.service import (
    END_OF_UTTERANCE,
    FAKE_IMAGE_TOKEN,
    IMAGE_TOKEN,
    Finished,
    GenerationFailed,
    GenerationRequest,
    ModelBusy,
    ModelImage,
    ModelInfo,
    ModelService,
    ModelTimeout,
    ModelUnavailable,
    Prompt,
    Queued,
    Started,
    StreamEvent,
)
from model.streamer import BatchRows, RowSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    """How requests are grouped: batch size, how long to wait for companions, how many may wait."""

    max_batch_size: int = 8
    max_wait_ms: float = 20.0
    max_queue: int = 64
    # After an out-of-memory error the batch size is halved; this many good batches later it doubles back.
    recover_after: int = 16
    # A batch that makes no progress (no new token) for this long is declared stuck: its requests
    # are answered with an error and a fresh worker thread takes over.
    stall_timeout_s: float = 120.0


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    enqueued: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    sink: RowSink | None = None

    def emit(self, event: StreamEvent | BaseException) -> None:
        """Hand an event to the asker; safe from the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class LocalBackend(ModelService):
    """IDEFICS loaded with transformers in this process, batching requests from all conversations."""

    def __init__(
        self,
        checkpoint: CheckpointSettings | None = None,
        batching: BatchSettings | None = None,
        logits_processors: list | None = None,
    ):
        """`logits_processors` (transformers `LogitsProcessor`s) are added to every `generate` call:
        a hook for experiments and for tests that force tokens."""
        self.checkpoint = checkpoint or CheckpointSettings()
        self.batching = batching or BatchSettings()
        self.logits_processors = logits_processors or []
        self.info = ModelInfo(name=self.checkpoint.checkpoint)
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idefics-generate")
        self._dispatcher: asyncio.Task | None = None
        self._running: list[_Job] = []
        self._batch_limit = self.batching.max_batch_size
        self._good_batches = 0
        self._last_progress = time.monotonic()  # written by the worker at every generation step
        self._closed = False
        self.batch_sizes: list[int] = []  # every batch run, in order; for tests and benchmarks

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._model, self._processor = await loop.run_in_executor(self._executor, load_checkpoint, self.checkpoint)
        tokenizer = self._processor.tokenizer
        self._tokenizer = tokenizer
        # Tokens are counted on the event loop while the worker tokenizes padded batches, and a fast
        # tokenizer keeps its padding setting on the shared Rust object: counting could switch a
        # batch's padding off halfway. So counting has a tokenizer of its own.
        self._counting_tokenizer = copy.deepcopy(tokenizer)
        self._end_ids = [tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE), tokenizer.eos_token_id]
        self._bad_words = tokenizer([IMAGE_TOKEN, FAKE_IMAGE_TOKEN], add_special_tokens=False).input_ids
        byte_ids = tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in range(256)])
        self._byte_ids = frozenset(byte_ids) - {tokenizer.unk_token_id}
        self.info = ModelInfo(name=self.checkpoint.checkpoint, context_tokens=self._model.config.max_position_embeddings)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="idefics-batcher")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        gone = ModelUnavailable("The bot is shutting down; your request was not answered.")
        for job in [*self._pending, *self._running]:
            job.cancelled = True
            job.emit(gone)
        self._pending.clear()
        # Let the running batch end (its rows stop at the next step); a stuck worker is left behind.
        ended = asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)
        await asyncio.wait({ended}, timeout=self.batching.stall_timeout_s)
        self._executor.shutdown(wait=False)

    # -- the interface -----------------------------------------------------------------------

    def health(self) -> dict[str, bool]:
        stalled = bool(self._running) and time.monotonic() - self._last_progress > self.batching.stall_timeout_s
        return {
            "loaded": hasattr(self, "_model") and not self._closed,
            "worker_alive": self._dispatcher is not None and not self._dispatcher.done() and not stalled,
        }

    async def count_tokens(self, prompt: Prompt) -> int:
        # The same text the processor builds: <s>, stripped text items, and image markers where
        # consecutive images share their surrounding <fake_token_around_image>.
        text, last_was_image = self._tokenizer.bos_token, False
        for item in prompt:
            if isinstance(item, str):
                text += item.strip(" ")
                last_was_image = False
            else:
                text += IMAGE_TOKEN + FAKE_IMAGE_TOKEN if last_was_image else FAKE_IMAGE_TOKEN + IMAGE_TOKEN + FAKE_IMAGE_TOKEN
                last_was_image = True
        return len(self._counting_tokenizer(text, add_special_tokens=False).input_ids)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        job = self._submit(request)
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

    # -- queueing (event loop side) ----------------------------------------------------------

    def _submit(self, request: GenerationRequest) -> _Job:
        if self._closed or self._dispatcher is None:
            raise ModelUnavailable("The model is not running right now; please try again shortly.")
        if len(self._pending) >= self.batching.max_queue:
            raise ModelBusy("I'm busy with other requests right now; please try again in a moment.")
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, enqueued=loop.time())
        self._pending.append(job)
        job.events.put_nowait(Queued(position=len(self._pending)))
        self._wakeup.set()
        return job

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        if job in self._pending:
            self._pending.remove(job)
            self._announce_positions()

    def _announce_positions(self) -> None:
        for position, job in enumerate(self._pending, start=1):
            job.events.put_nowait(Queued(position=position))

    async def _dispatch(self) -> None:
        while True:
            await self._gather_companions(asyncio.get_running_loop())
            batch = self._take_batch()
            if not batch:
                continue
            self._running = batch
            self._announce_positions()
            try:
                await self._supervise(batch)
            except Exception:  # the batcher must outlive any one batch
                log.exception("batch.crashed", extra={"size": len(batch)})
                self._fail(batch, GenerationFailed("Sorry, something went wrong while answering. Please try again."))
            finally:
                self._running = []

    async def _supervise(self, batch: list[_Job]) -> None:
        """Run `batch` on the worker thread; if it stops making progress, answer its requests and
        replace the worker (a thread stuck in native code can't be killed, only abandoned)."""
        self._last_progress = time.monotonic()
        work = asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, batch)
        check_every = min(1.0, self.batching.stall_timeout_s / 4)
        while True:
            done, _ = await asyncio.wait({work}, timeout=check_every)
            if done:
                work.result()
                return
            stalled = time.monotonic() - self._last_progress
            if stalled > self.batching.stall_timeout_s:
                log.error("worker.stuck", extra={"size": len(batch), "stalled_s": round(stalled, 1)})
                self._fail(batch, GenerationFailed("Sorry, the model stopped responding, so I gave up on this request. Please try again."))
                self._executor.shutdown(wait=False)
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idefics-generate")
                return

    @staticmethod
    def _fail(batch: list[_Job], error: Exception) -> None:
        for job in batch:
            if not job.cancelled and not (job.sink and job.sink.finished):
                job.cancelled = True
                job.emit(error)

    async def _gather_companions(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for work, then briefly for more requests to share the batch with."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        until = self._pending[0].enqueued + self.batching.max_wait_ms / 1000
        while len(self._pending) < self._batch_limit and loop.time() < until:
            self._wakeup.clear()
            try:
                async with asyncio.timeout_at(until):
                    await self._wakeup.wait()
            except TimeoutError:
                break

    def _take_batch(self) -> list[_Job]:
        if not self._pending:
            return []
        key = self._pending[0].request.params.batch_key()
        batch = [job for job in self._pending if job.request.params.batch_key() == key][: self._batch_limit]
        self.batch_sizes.append(len(batch))
        for job in batch:
            self._pending.remove(job)
            job.events.put_nowait(Started(batch_size=len(batch)))
        return batch

    # -- generation (worker thread) ----------------------------------------------------------

    def _run_batch(self, jobs: list[_Job]) -> None:
        """Run `jobs` as one batch; when the model raises, split it so one bad request fails alone."""
        jobs = [job for job in jobs if not job.cancelled and not (job.sink and job.sink.finished)]
        if not jobs:
            return
        started = time.perf_counter()
        try:
            self._generate(jobs)
        except Exception as exc:
            out_of_memory = _is_out_of_memory(exc)
            if out_of_memory:
                self._shrink_batches(len(jobs))
            if len(jobs) > 1:
                log.warning("batch.split", extra={"size": len(jobs), "error": type(exc).__name__})
                # Out of memory: the rest goes in batches the lowered limit allows (lowered again if
                # they still don't fit). Any other error: halves, until the request that fails is alone.
                size = self._batch_limit if out_of_memory else len(jobs) // 2
                while jobs:
                    self._run_batch(jobs[:size])
                    jobs = jobs[size:]
                    size = self._batch_limit if out_of_memory else len(jobs)
                return
            log.exception("request.failed", extra={"request": jobs[0].request.label})
            detail = "it ran out of memory" if out_of_memory else "it hit an internal error"
            jobs[0].emit(GenerationFailed(f"Sorry, the model could not answer this one ({detail}). Please try again."))
            return
        self._grow_batches()
        log.info("batch.done", extra={"size": len(jobs), "seconds": round(time.perf_counter() - started, 3)})

    def _generate(self, jobs: list[_Job]) -> None:
        import torch
        from transformers.generation.logits_process import LogitsProcessorList
        from transformers.generation.stopping_criteria import StoppingCriteriaList

        for job in jobs:
            if job.sink is None:
                job.sink = RowSink(
                    emit=job.emit,
                    max_new_tokens=job.request.params.max_new_tokens,
                    stop_strings=job.request.stop_strings,
                    is_cancelled=lambda job=job: job.cancelled,
                )
        inputs = self._processor(
            text=[self._processor_items(job.request.prompt) for job in jobs],
            padding=True,
            return_tensors="pt",
            add_end_of_utterance_token=False,
        ).to(self._model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        rows = BatchRows([job.sink for job in jobs], self._decode, self._end_ids, self._byte_ids, on_step=self._progressed)
        params = jobs[0].request.params
        settings = {
            "max_new_tokens": max(job.request.params.max_new_tokens for job in jobs),
            "do_sample": params.do_sample,
            "repetition_penalty": params.repetition_penalty,
            "eos_token_id": self._end_ids,
            "pad_token_id": self._tokenizer.pad_token_id,
            "bad_words_ids": self._bad_words,
            "streamer": rows,
            "stopping_criteria": StoppingCriteriaList([rows]),
            "logits_processor": LogitsProcessorList(self.logits_processors),
        }
        if params.do_sample:
            settings.update(temperature=params.temperature, top_p=params.top_p)
        with torch.inference_mode():
            self._model.generate(**inputs, **settings)

    def _progressed(self) -> None:
        self._last_progress = time.monotonic()

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _processor_items(prompt: Prompt) -> list:
        """Prompt items as the processor takes them: PIL images, and text it can't mistake for a URL.

        The processor downloads any text item that parses as a URL. Such an item (a user typing only
        a link) is handed over one character at a time: the processor concatenates text items with
        no separator, so the tokens are the same, and no single character is a URL.
        """
        from transformers.models.idefics.processing_idefics import is_url

        items: list = []
        for item in prompt:
            if isinstance(item, ModelImage):
                items.append(item.open())
            elif is_url(item.strip(" ")):
                items.extend(item)
            else:
                items.append(item)
        return items

    def _shrink_batches(self, failed_size: int) -> None:
        """Halve the batch limit below the size that ran out of memory."""
        import torch

        self._batch_limit = max(1, min(self._batch_limit, failed_size) // 2)
        self._good_batches = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("batch.limit_lowered", extra={"limit": self._batch_limit})

    def _grow_batches(self) -> None:
        if self._batch_limit >= self.batching.max_batch_size:
            return
        self._good_batches += 1
        if self._good_batches >= self.batching.recover_after:
            self._batch_limit = min(self.batching.max_batch_size, self._batch_limit * 2)
            self._good_batches = 0
            log.info("batch.limit_raised", extra={"limit": self._batch_limit})


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
