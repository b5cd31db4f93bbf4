"""A window on the real model for tests: a row processor added to the local backend that `run_bot`
creates (through the real `bot.runtime.app.open_model`). It records what the model was given, makes replies
say what a test wants, and can hold generation on the model's worker thread (a slow model) until the
test lets it go.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import LogitsProcessor

import bot.runtime.app

_FREE = -1  # in a reply's plan: the model's own choice of token, but not the end


class ModelTap:
    """Sees every request the model it is added to takes into its running batch.

    - `prompts`: every request's prompt, decoded with its special tokens.
    - Replies: `force_next(text)` makes the next request answer `text`; otherwise each reply says `say`
      (a text, or a function of the request's prompt) and ends there, or goes on if `finish` is False;
      with nothing to say, a reply is `length` tokens of the model's own choosing.
    - While `gate` is clear, a reply holds (and with it the worker, so the whole batch) right after
      the said text (at the start when there is none) and `held` is set; setting `gate` lets it go on.
    """

    def __init__(self) -> None:
        self.backend = None
        self._tokenizer = None
        self.prompts: list[str] = []
        self.say: str | Callable[[str], str] = ""
        self.finish = True
        self.length = 8
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()
        self._forced: list[str] = []

    @property
    def tokenizer(self):
        """A copy of the model's tokenizer: the test calls it while the model's worker tokenizes a
        prompt with the original, whose padding setting a call from here would change."""
        if self._tokenizer is None:
            self._tokenizer = copy.deepcopy(self.backend._tokenizer)
        return self._tokenizer

    def spelled(self, text: str) -> str:
        """`text` as the model spells it when made to say it."""
        return self.tokenizer.decode(self.tokenizer(text, add_special_tokens=False).input_ids, skip_special_tokens=True).strip()

    def force_next(self, text: str) -> str:
        """Make the next request answer `text`; returns the reply as the model will spell it."""
        self._forced.append(text)
        return self.spelled(text)

    def prompt(self, index: int = -1) -> str:
        """One request's prompt (by default the latest)."""
        return self.prompts[index]

    @staticmethod
    def images(prompt: str) -> int:
        """How many images a recorded prompt holds: IDEFICS v1 writes one <image> for each; Idefics3
        a run of them per tile, and one global image each."""
        return prompt.count("<global-img>") if "<global-img>" in prompt else prompt.count("<image>")

    async def wait_held(self, timeout: float = 60) -> None:
        assert await asyncio.to_thread(self.held.wait, timeout), "generation never reached the hold point"

    def __call__(self, prompt_ids: list[int]) -> LogitsProcessor:
        """A new request joins the batch: record its prompt and plan its reply."""
        tokenizer = self.tokenizer
        end = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        prompt = tokenizer.decode(prompt_ids)
        self.prompts.append(prompt)
        forced = self._forced.pop(0) if self._forced else None
        text = forced if forced is not None else self.say(prompt) if callable(self.say) else self.say
        said = tokenizer(text, add_special_tokens=False).input_ids if text else []
        plan = [*said, end] if self.finish or forced is not None else said
        if not said:
            plan = [_FREE] * self.length + [end]
        return _PlannedReply(self, plan, hold_at=len(said), ends=[end, tokenizer.eos_token_id])


class _PlannedReply(LogitsProcessor):
    """One row's reply as its tap planned it."""

    def __init__(self, tap: ModelTap, plan: list[int], hold_at: int, ends: list[int]):
        self.tap, self.plan, self.hold_at, self.ends = tap, plan, hold_at, ends
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step, self.step = self.step, self.step + 1
        if step >= self.hold_at and not self.tap.gate.is_set():
            self.tap.held.set()
            self.tap.gate.wait(120)
        if step < len(self.plan):
            if self.plan[step] == _FREE:
                scores[:, self.ends] = -torch.inf
            else:
                scores[:, :] = -torch.inf
                scores[:, self.plan[step]] = 0.0
        return scores


@contextmanager
def tapping(tap: ModelTap) -> Iterator[ModelTap]:
    """While inside, every model that `bot.runtime.app.open_model` opens (so every `run_bot` that starts)
    gets `tap`; the tap stays on those models afterwards."""
    open_model = bot.runtime.app.open_model

    async def tapped(config):
        tap.backend = await open_model(config)
        tap.backend.row_processors.append(tap)
        return tap.backend

    bot.runtime.app.open_model = tapped
    try:
        yield tap
    finally:
        bot.runtime.app.open_model = open_model


@pytest.fixture
def tap() -> Iterator[ModelTap]:
    """One `ModelTap` on every model the test starts (a restarted bot keeps it)."""
    with tapping(ModelTap()) as model_tap:
        yield model_tap
        model_tap.gate.set()  # a held model must not outlive the test
