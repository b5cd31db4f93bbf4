"""One reply's text, token by token: incremental detokenization, stopping, and streamed deltas.

Each row of the running batch has a `ReplyStream`. It turns the row's tokens into text with TGI's
offset technique (decode only the few tokens since the last stable point, so a step costs the same
at token 500 as at token 5), decides when the reply ends (an end token, a stop string, its own
max_new_tokens), and sends `TextDelta`s that add up to the `Finished` text.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from model.reply_text import visible_text
from model.service import Finished, TextDelta

Decode = Callable[[list[int]], str]


class IncrementalText:
    """Text of a growing token sequence, decoded a few tokens at a time.

    Decoding `ids[prefix:]` and `ids[prefix:read]` and keeping the difference gives the text the new
    tokens add, with the tokenizer's context (leading spaces, merges) taken into account. While the
    new text ends in an incomplete character, or in a byte-fallback token (a run of them decodes as
    one unit: an invalid run becomes all replacement characters), it waits for more tokens."""

    def __init__(self, decode: Decode, byte_ids: Collection[int] = frozenset()):
        self._decode = decode
        self._byte_ids = byte_ids
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        if token in self._byte_ids:
            return
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def flush(self) -> str:
        """The whole text, including a tail that is still waiting (shown as decoded)."""
        before = self._decode(self.ids[self._prefix : self._read])
        return self.text + self._decode(self.ids[self._prefix :])[len(before) :]


class ReplyStream:
    """Where one row's tokens go: its text, its stops, and the events for the asker.

    `emitted` outlives a row's place in a batch: a row that is put back into the queue (its batch ran
    out of memory) continues its reply from there when it is decoded again.
    """

    def __init__(
        self,
        emit: Callable[[Any], None],
        decode: Decode,
        end_ids: Collection[int],
        max_new_tokens: int,
        stop_strings: Sequence[str],
        byte_ids: Collection[int] = frozenset(),
    ):
        self._emit = emit
        self._end_ids = end_ids
        self._max_new_tokens = max_new_tokens
        self._stop_strings = stop_strings
        self._text = IncrementalText(decode, byte_ids)
        self.emitted = ""
        self.finished = False

    @property
    def tokens(self) -> int:
        return len(self._text.ids)

    def push(self, token: int) -> bool:
        """Take the row's next token; True once the reply has ended (and `Finished` was sent)."""
        if token in self._end_ids:
            self._finish("stop")
            return True
        shown = len(self._text.text)
        self._text.add(token)
        if len(self._text.text) > shown or self.tokens >= self._max_new_tokens:
            text, stopped = visible_text(self._text.text, self._stop_strings, final=False)
            if stopped:
                self._finish("stop")
            elif self.tokens >= self._max_new_tokens:
                self._finish("length")
            else:
                self._send(text)
        return self.finished

    def _finish(self, reason: str) -> None:
        text, _ = visible_text(self._text.flush(), self._stop_strings, final=True)
        self._send(text)
        self.finished = True
        self._emit(Finished(text=text, reason=reason, tokens=self.tokens))

    def _send(self, text: str) -> None:
        # The final text may drop what was held back as a possible stop; then only Finished tells.
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            self._emit(TextDelta(text[len(self.emitted) :]))
            self.emitted = text
