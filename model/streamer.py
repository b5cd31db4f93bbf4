"""Per-row streaming and stopping for one batched `generate` call.

transformers' text streamers refuse batches. `BatchRows` is both the streamer (`put` receives the new
token of every row at each step) and the stopping criterion (one flag per row), so each request in a
batch streams its own text and stops on its own: at an end token, at a stop string, at its own
max_new_tokens, or when its asker went away. The other rows go on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from model.reply_text import visible_text
from model.service import Finished, TextDelta


@dataclass(eq=False)
class RowSink:
    """Where one row's text goes: the request's callbacks and what it has been sent so far.

    `emitted` outlives a single `generate` call: when a failed batch is re-run, a row that already
    streamed part of its reply continues from there instead of sending it twice.
    """

    emit: Callable[[object], None]
    max_new_tokens: int
    stop_strings: tuple[str, ...]
    is_cancelled: Callable[[], bool]
    emitted: str = ""
    finished: bool = False


@dataclass(eq=False)
class _Row:
    sink: RowSink
    ids: list[int] = field(default_factory=list)
    done: bool = False


class BatchRows(BaseStreamer, StoppingCriteria):
    """Streamer and stopping criterion for the rows of one batch, in batch order."""

    def __init__(
        self,
        sinks: Sequence[RowSink],
        decode: Callable[[list[int]], str],
        end_ids: Sequence[int],
        byte_ids: frozenset[int] = frozenset(),
        on_step: Callable[[], None] = lambda: None,
    ):
        self._rows = [_Row(sink) for sink in sinks]
        self._on_step = on_step
        self._decode = decode
        self._end_ids = frozenset(end_ids)
        self._byte_ids = byte_ids
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        self._on_step()
        if not self._prompt_seen:  # the first call carries the prompts, not new tokens
            self._prompt_seen = True
            return
        for row, token in zip(self._rows, value.reshape(-1).tolist()):
            if not row.done:
                self._advance(row, token)

    def end(self) -> None:
        """Called by `generate` when it returns; rows still open ran out of tokens."""
        for row in self._rows:
            if not row.done:
                self._finish(row, "length")

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        for row in self._rows:
            if not row.done and row.sink.is_cancelled():
                row.done = True  # nobody is listening: stop spending compute on this row
        return torch.tensor([row.done for row in self._rows], dtype=torch.bool, device=input_ids.device)

    @property
    def all_done(self) -> bool:
        return all(row.done for row in self._rows)

    def _advance(self, row: _Row, token: int) -> None:
        if token in self._end_ids:
            self._finish(row, "stop")
            return
        row.ids.append(token)
        # A run of byte-fallback tokens decodes as one unit (a character may still be incomplete,
        # or the run invalid), so it is shown only once a regular token closes it.
        stable = len(row.ids)
        while stable and row.ids[stable - 1] in self._byte_ids:
            stable -= 1
        text, stopped = visible_text(self._decode(row.ids[:stable]), row.sink.stop_strings, final=False)
        if stopped:
            self._finish(row, "stop")
        elif len(row.ids) >= row.sink.max_new_tokens:
            self._finish(row, "length")
        else:
            self._send(row.sink, text)

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        text, _ = visible_text(self._decode(row.ids), row.sink.stop_strings, final=True)
        self._send(row.sink, text)
        row.sink.finished = True
        row.sink.emit(Finished(text=text, reason=reason, tokens=len(row.ids)))

    @staticmethod
    def _send(sink: RowSink, text: str) -> None:
        # A re-run with sampling may diverge from what was already shown; then only Finished tells.
        if len(text) > len(sink.emitted) and text.startswith(sink.emitted):
            sink.emit(TextDelta(text[len(sink.emitted) :]))
            sink.emitted = text
