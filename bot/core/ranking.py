"""Classification that always answers with a label: the model weighs every label after the guide's
prompt, and the answer names the most likely one, the runner-up, and their share of the probability."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from model.service import Chat, ModelService, ScoreRequest


@dataclass(frozen=True)
class Ranking:
    """Labels from most to least likely, with probabilities normalised over the labels."""

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]

    def answer(self) -> str:
        """The best label and the runner-up, e.g. "cat (82%), then dog (15%)"."""
        best, runner_up = (f"{label} ({_percent(p)})" for label, p in zip(self.labels[:2], self.probabilities[:2]))
        return f"{best}, then {runner_up}"


def _percent(probability: float) -> str:
    return "<1%" if probability < 0.005 else f"{probability:.0%}"


def rank(labels: Sequence[str], log_likelihoods: Sequence[float]) -> Ranking:
    """Normalise the labels' log-likelihoods into probabilities (a softmax) and order them. Labels
    the model rules out entirely share nothing; if it rules out all of them, all are equal."""
    finite = [score for score in log_likelihoods if math.isfinite(score)]
    top = max(finite, default=0.0)
    weights = [math.exp(score - top) if math.isfinite(score) else 0.0 for score in log_likelihoods] if finite else [1.0] * len(labels)
    total = sum(weights)
    order = sorted(range(len(labels)), key=lambda i: -weights[i])  # stable: ties keep the asker's order
    return Ranking(tuple(labels[i] for i in order), tuple(weights[i] / total for i in order))


async def classify(model: ModelService, prompt: Chat, labels: Sequence[str], **request) -> Ranking:
    """Rank `labels` after `prompt` (whose reply starts with "Category: "); `request` holds
    `ScoreRequest`'s time limits and log label."""
    scores = await model.score(ScoreRequest(prompt=prompt, continuations=tuple(labels), **request))
    return rank(labels, scores)


def named_label(reply: str, labels: Sequence[str]) -> str | None:
    """The label a freely written reply names: the longest one it starts with, else the one it
    mentions first (ignoring case and surrounding punctuation); None if it names none."""
    text = reply.strip().strip("\"'.,:;!").lower()
    starting = [label for label in labels if text.startswith(label.lower())]
    if starting:
        return max(starting, key=len)
    found = [(text.find(label.lower()), -len(label), label) for label in labels if label.lower() in text]
    return min(found)[2] if found else None
