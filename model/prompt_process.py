"""The processor in a process of its own, so that the running batch decodes while prompts are processed.

Processing a prompt is CPU work: the chat template, the tokenizer, and for every new image the image
processor's decoding, resizing, tiling and normalizing (tens of milliseconds per photo for the larger
processors; a scoring also tokenizes each of its continuations). Done on the model's worker between
two steps, every running row waits for it. Here it runs beside the batch, as vLLM splits the same
work between its front-end process and its engine core, and the worker is left the vision encoder
and the forward. A thread would not do: the processor's Python holds the GIL that the decoding worker
needs between its kernels (measured on the tiny checkpoint: decoding steps about 3x slower).

One process, a `ProcessPoolExecutor` of one, started from a fork server that has the families'
processor modules imported (about 50 ms a start, instead of seconds of imports, and no copy of the
model's threads or memory, which forking the bot itself would make). It gets the loaded processor
and config (pickled) and builds its own `Family`. Whatever it can't do (not started, or died) the
worker does as before: the calls return None, and a process that died is replaced. A prompt the
processor rejects raises its error to the caller, as it would on the worker.

A model on the CPU with a core its worker doesn't use also has its new images encoded here: the
process gets a copy of the model's vision part (`Family.vision`: the vision encoder and perceiver or
connector; SmolVLM-256M's is about 370 MB in float32) and runs it on the spare cores, so a new photo
no longer stops everyone's replies while the vision encoder works through its tiles (seconds on a
CPU, for SmolVLM). On a GPU the vision part stays with the model, where it is fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import multiprocessing
import os
from collections.abc import Callable, Container, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, TypeVar

from model.family import Family, ProcessedPrompt
from model.scoring import ProcessedScoring, process_scoring
from model.service import Chat

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# Imported once by the fork server, so that a new prompt process starts without importing them.
_PRELOAD = [
    "model.families",
    "model.scoring",
    "transformers.models.idefics.processing_idefics",
    "transformers.models.idefics.image_processing_idefics",
    "transformers.models.idefics3.processing_idefics3",
    "transformers.models.idefics3.image_processing_idefics3",
    "transformers.models.idefics.modeling_idefics",  # what a copy of the vision part unpickles into
    "transformers.models.idefics3.modeling_idefics3",
    "transformers.models.llama.tokenization_llama_fast",
    "transformers.models.gpt2.tokenization_gpt2_fast",
    "transformers.tokenization_utils_fast",
]

_START_TIMEOUT_S = 60.0  # for the process to start and answer; past it, the worker processes everything

# In the prompt process: its own family, built from the backend's processor, and its own copy of
# the model's vision part (`Family.vision`) if it encodes images too.
_family: Family | None = None
_vision: torch.nn.Module | None = None


def _start(processor, config) -> None:
    import torch

    from model.families import family_for

    global _family
    # One core beside the worker's: neither torch nor the tokenizer's thread pool spreads to the others.
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _family = family_for(processor, config)


def _take_vision(saved: bytes, threads: int) -> None:
    import torch

    global _vision
    torch.set_num_threads(threads)
    # Not weights only: a whole module, pickled by the backend that started this process.
    _vision = torch.load(io.BytesIO(saved), weights_only=False)


def _encoded(processed: ProcessedPrompt) -> ProcessedPrompt:
    """`processed` with its new images through this process's vision part, if it has one."""
    import torch

    if _vision is None or not processed.new:
        return processed
    assert _family is not None
    with torch.inference_mode():
        states = _family.encode_images(_vision, processed)
    return dataclasses.replace(processed, pixels={}, states=tuple(states))


def _process(chat: Chat, cached: Container[str]) -> ProcessedPrompt:
    assert _family is not None
    return _encoded(_family.process(chat, cached))


def _process_scoring(chat: Chat, continuations: Sequence[str], cached: Container[str]) -> ProcessedScoring:
    assert _family is not None
    scoring = process_scoring(_family, chat, continuations, cached)
    return dataclasses.replace(scoring, prompt=_encoded(scoring.prompt))


def _saved(vision: torch.nn.Module) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(vision, buffer)
    return buffer.getvalue()


def _context():
    """A fork server where the platform has one (Linux, macOS), else a fresh interpreter per process."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


class PromptProcess:
    """Processes prompts for `family` in a process of its own. Started by `await PromptProcess.open(family)`."""

    def __init__(self, family: Family, vision: torch.nn.Module | None = None, threads: int = 1):
        self.family = family
        self._vision = vision  # the model's own modules; the process gets a copy at every start
        self._threads = threads
        self._executor: ProcessPoolExecutor | None = None
        self._pid: int | None = None  # while it is up
        self._restart: asyncio.Task | None = None
        self._closed = False
        self.processed = 0  # prompts and scorings it has processed; for tests and benchmarks
        self._working = 0  # calls under way

    @classmethod
    async def open(cls, family: Family, vision: torch.nn.Module | None = None, threads: int = 1, timeout: float = _START_TIMEOUT_S) -> PromptProcess:
        """A prompt process, started and ready within `timeout` seconds; if it can't start, prompts
        are processed on the model's worker as before (and the reason is logged). With `vision`
        (`Family.vision` of a model on the CPU), it encodes new images too, on `threads` threads, with
        a copy of those weights; if the copy fails, it only processes."""
        process = cls(family, vision, threads)
        await process._start(timeout)
        return process

    async def _start(self, timeout: float) -> None:
        self._executor = executor = ProcessPoolExecutor(1, mp_context=_context(), initializer=_start, initargs=(self.family.processor, self.family.config))
        try:
            pid = await asyncio.wait_for(asyncio.wrap_future(executor.submit(os.getpid)), timeout)
        except Exception as exc:  # a platform without processes, a processor that doesn't pickle, ...
            log.warning("prompt_process.unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            return
        if self._vision is not None:
            await self._copy_vision(executor, self._vision, timeout)
        if self._closed:
            executor.shutdown(wait=False, cancel_futures=True)
            return
        self._pid = pid
        log.info("prompt_process.started", extra={"pid": pid, "encodes_images": self.encodes})

    async def _copy_vision(self, executor: ProcessPoolExecutor, vision: torch.nn.Module, timeout: float) -> None:
        """Hand the process its copy of the vision part (pickled off the event loop: hundreds of
        megabytes for SmolVLM's). If that fails, no later process gets one (the copy could be what
        killed it) and the worker encodes images."""
        try:
            saved = await asyncio.to_thread(_saved, vision)
            await asyncio.wait_for(asyncio.wrap_future(executor.submit(_take_vision, saved, self._threads)), timeout)
        except Exception as exc:  # a module that doesn't pickle, no memory for the copy, ...
            log.warning("prompt_process.no_vision", extra={"error": f"{type(exc).__name__}: {exc}"})
            self._vision = None

    async def ready(self) -> bool:
        """Whether prompts are processed in the process, once a restart under way has ended."""
        if self._restart is not None:
            await asyncio.shield(self._restart)
        return self.pid is not None

    @property
    def idle(self) -> bool:
        """Whether it is up and has nothing to do: a prompt sent now is processed at once."""
        return self.pid is not None and not self._working

    @property
    def encodes(self) -> bool:
        """Whether it is up and encodes new images too, with its copy of the vision part."""
        return self.pid is not None and self._vision is not None

    @property
    def pid(self) -> int | None:
        """The process's id while prompts are processed there (None: on the model's worker)."""
        return None if self._closed else self._pid

    async def process(self, chat: Chat, cached: frozenset[str]) -> ProcessedPrompt | None:
        """`chat` through the processor, images whose digests are in `cached` left out (see
        `Family.process`); None if the worker should process it."""
        return await self._call(_process, chat, cached)

    async def process_scoring(self, chat: Chat, continuations: Sequence[str], cached: frozenset[str]) -> ProcessedScoring | None:
        """A scoring through the processor (see `model.scoring.process_scoring`); None if the worker should."""
        return await self._call(_process_scoring, chat, tuple(continuations), cached)

    async def _call(self, work: Callable[..., T], *args: Any) -> T | None:
        executor = self._executor
        if self.pid is None or executor is None:
            return None
        self._working += 1
        try:
            done: Future = executor.submit(work, *args)
            result = await asyncio.wrap_future(done)
        except BrokenProcessPool:
            # Killed (out of memory, say): this prompt goes to the worker, and a fresh process starts.
            if executor is self._executor and not self._closed:
                log.warning("prompt_process.died", extra={"pid": self._pid})
                self._pid = None
                executor.shutdown(wait=False, cancel_futures=True)
                self._restart = asyncio.get_running_loop().create_task(self._start(_START_TIMEOUT_S))
            return None
        finally:
            self._working -= 1
        self.processed += 1
        return result

    def close(self) -> None:
        """Stop the process (what it was doing is dropped)."""
        self._closed = True
        if self._restart is not None:
            self._restart.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
