"""Beam search as rows of the running batch: one request, `num_beams` rows, searched a step at a time.

The beams decode beside everybody else's rows; after each forward, `BeamSearch.step` takes the beams'
logits, chooses each beam's next token and the beam it continues (its parent), and the batch copies
the parents' caches into the beams' rows. The algorithm is that of transformers' `generate` with
`num_beams` (transformers 5's `_beam_search`, at its defaults: length penalty 1.0, no early
stopping, the top (1 + end tokens) x `num_beams` candidates kept each step), so the tokens are those
of `generate(num_beams=...)` on the request alone in fp32. The reply is only known at the end (the
best candidate may change until the last step), so it arrives whole.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from model.reply_text import visible_text
from model.service import Finished

_FAR = -1.0e9  # generate's score for "never choose this"


class BeamSearch:
    """The state of one request's beam search; its beams are the rows in `rows` (beam i is `rows[i]`)."""

    def __init__(
        self,
        prompt_ids: list[int],
        num_beams: int,
        max_new_tokens: int,
        *,
        end_ids: Collection[int],
        banned_ids: Sequence[int],
        repetition_penalty: float = 1.0,
        processors: Sequence[LogitsProcessor] = (),
        length_penalty: float = 1.0,
    ):
        self.num_beams = num_beams
        self.prompt_length = len(prompt_ids)
        self.max_length = self.prompt_length + max_new_tokens
        self.end_ids = list(end_ids)
        self.banned_ids = list(banned_ids)
        # generate's order: repetition penalty, banned tokens, then the request's own processors.
        self.processors: list[Any] = [RepetitionPenaltyLogitsProcessor(repetition_penalty)] if repetition_penalty != 1.0 else []
        self.processors += [self._ban, *processors]
        self.length_penalty = length_penalty
        self.candidates = max(2, 1 + len(self.end_ids)) * num_beams
        self.rows: list = []  # the batch's rows, set by whoever makes them
        self.length = self.prompt_length
        self.done = False
        self._prompt = torch.tensor(prompt_ids)
        self._running: torch.Tensor | None = None  # (beams, max_length) token ids, filled up to `length`

    def _ban(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill_(1, self._banned, -float("inf"))

    @property
    def started(self) -> bool:
        """Whether the search has taken a step (before that, every beam is the prompt)."""
        return self._running is not None

    def _start(self, device: torch.device) -> None:
        self._running = torch.zeros((self.num_beams, self.max_length), dtype=torch.long, device=device)
        self._running[:, : self.prompt_length] = self._prompt.to(device)
        self._scores = torch.zeros(self.num_beams, device=device)
        self._scores[1:] = _FAR  # only the first beam's tokens count at first: the beams start equal
        self._finished = self._running.clone()  # the best finished candidates, best first
        self._finished_scores = torch.full((self.num_beams,), _FAR, device=device)
        self._finished_lengths = torch.zeros(self.num_beams, dtype=torch.long, device=device)
        self._is_finished = torch.zeros(self.num_beams, dtype=torch.bool, device=device)
        self._worst_finished = torch.full((self.num_beams,), _FAR, device=device)  # what a running beam must beat
        self._top = torch.arange(self.candidates, device=device) < self.num_beams
        self._end_ids = torch.tensor(self.end_ids, dtype=torch.long, device=device)
        self._banned = torch.tensor(self.banned_ids, dtype=torch.long, device=device)
        self._all_end = torch.ones(self.candidates, dtype=torch.bool, device=device)
        self._in_place = list(range(self.num_beams))

    def step(self, logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """One step from the beams' next-token `logits` (beams, vocabulary), fp32: for each beam, the
        beam it continues (on the host) and its new token (on the logits' device). Sets `done` when
        the search is over; a search that is `done` takes no more steps."""
        if self.done:
            raise RuntimeError("this beam search is over: its rows should have left the batch")
        if self._running is None:
            self._start(logits.device)
        assert self._running is not None
        length, beams = self.length, self.num_beams
        log_probs = torch.log_softmax(logits, dim=-1)
        so_far = self._running[:, :length]
        for processor in self.processors:
            log_probs = processor(so_far, log_probs)
        vocabulary = log_probs.shape[-1]
        totals = (log_probs + self._scores[:, None]).reshape(-1)
        top_scores, top_indices = torch.topk(totals, k=self.candidates)
        tokens = top_indices % vocabulary
        ends = self._all_end if length + 1 >= self.max_length else torch.isin(tokens, self._end_ids)

        # The beams that go on: the best candidates that did not end.
        going_on = torch.add(top_scores, ends, alpha=_FAR)
        chosen = torch.topk(going_on, k=beams)[1]
        self._scores = going_on[chosen]
        beam_parents = top_indices[chosen] // vocabulary
        beam_tokens = tokens[chosen]
        parents, ended = beam_parents.tolist(), ends.tolist()
        # Only the top `beams` candidates may finish: when none of them ended, the merge would only
        # shuffle placeholder entries the search never reads, so it is skipped.
        if any(ended[:beams]):
            self._finish(length, top_scores, top_indices // vocabulary, tokens, ends)
        if parents != self._in_place:
            self._running = self._running[beam_parents]
        self._running[:, length] = beam_tokens

        self.length = length + 1
        # generate's stopping rule: go on while a running beam could still beat the worst finished one.
        # (generate remembers that it could not; here the search is then done and takes no more steps.)
        best_possible = self._scores[:1] / ((self.length - self.prompt_length) ** self.length_penalty)
        improvable = bool(torch.any(best_possible > self._worst_finished))
        self.done = not improvable or all(ended)
        return parents, beam_tokens

    def _finish(self, length: int, top_scores: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor, ends: torch.Tensor) -> None:
        """Merge the top candidates that ended at this step into the finished ones, keeping the best."""
        assert self._running is not None
        beams = self.num_beams
        candidates = self._running[parents]
        candidates[:, length] = tokens
        ended_now = ends & self._top
        finished_scores = top_scores / ((length + 1 - self.prompt_length) ** self.length_penalty)
        finished_scores += (~ended_now) * _FAR
        merged_scores = torch.cat((self._finished_scores, finished_scores))
        best = torch.topk(merged_scores, k=beams)[1]
        self._finished = torch.cat((self._finished, candidates))[best]
        self._finished_scores = merged_scores[best]
        self._finished_lengths = torch.cat((self._finished_lengths, torch.full_like(tokens, length + 1)))[best]
        self._is_finished = torch.cat((self._is_finished, ended_now))[best]
        self._worst_finished = torch.where(self._is_finished, torch.min(self._finished_scores), _FAR)

    def beam_ids(self, beam: int) -> list[int]:
        """Beam `beam`'s tokens so far, prompt included."""
        assert self._running is not None
        return self._running[beam, : self.length].tolist()

    def best(self) -> list[int]:
        """The reply tokens of the best finished candidate (once `done`)."""
        return self._finished[0, self.prompt_length : int(self._finished_lengths[0])].tolist()


def beam_reply(search: BeamSearch, decode, end_ids: Collection[int], stop_strings: Sequence[str]) -> Finished:
    """The finished reply of a search that is `done`: cut at its end token and stop strings by the
    same rule as a streamed reply."""
    row = search.best()
    ended = next((at for at, token in enumerate(row) if token in end_ids), None)
    ids = row if ended is None else row[:ended]
    text, stopped = visible_text(decode(ids), stop_strings, final=True)
    return Finished(text=text, reason="stop" if stopped or ended is not None else "length", tokens=len(ids))
