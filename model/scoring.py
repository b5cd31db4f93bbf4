"""Weighing continuations of one prompt by the model's likelihood, as one prefill-only request.

The prompt's images go through the vision encoder once (the family's `prepare`), and every
continuation becomes a row (the prompt with the continuation written after the start of its reply,
`Chat.continued`, as if the model had written it there). The tokens all rows share are prefilled once; the rows' own tokens
then go through the model together in one more forward, on copies of that cache: the cost of one
newcomer's prefill in the running batch, not one per label. A continuation's score is the sum of the log probabilities of its
tokens (from where its tokens stop matching the prompt's own) and of its ending there: the
probability of an end token right after it. Without that end, a label whose tokens begin another's
("dog" and "dog house") would always win.
The logits processors that shape generation shape these scores too, position by position: each
factory of the backend's `row_processors` makes one for the prompt, applied to all its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from model.batch import Batch, Prompt, Row
from model.service import Chat


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def continuation_ids(model, family, chat: Chat, continuations: Sequence[str]) -> tuple[Prompt, list[list[int]], list[int]]:
    """The prompt (its images encoded), each continuation's token ids (the whole chat with it), and
    where each one's own tokens start. Only the reply changes, so every token after the prompt's
    common part sees the images the prompt's last token sees."""
    prompt = family.prepare(model, chat)
    rows, starts = [], []
    for text in continuations:
        ids = family.token_ids(chat.continued(text))
        start = _common_prefix(prompt.ids, ids)
        if start == len(ids):
            raise ValueError("every continuation must add at least one token")
        rows.append(ids)
        starts.append(start)
    return prompt, rows, starts


def score_continuations(
    model, family, chat: Chat, continuations: Sequence[str], *, end_ids: Collection[int], row_processors: Sequence[Callable] = ()
) -> list[float]:
    """The log-likelihood of each continuation, then an end token, as the reply to `chat`; `family`
    (model/family.py) makes the model's input. The part all rows share is prefilled once; each row's
    own tokens then run on copies of its cache."""
    prompt, rows, starts = continuation_ids(model, family, chat, continuations)
    logits_processors = [make(list(prompt.ids)) for make in row_processors]
    shared = min(starts)
    common = Row(owner="prompt", prompt=Prompt(prompt.ids[:shared], prompt.image_mask[:shared], prompt.images), max_new_tokens=0)
    pad_id = family.tokenizer.pad_token_id
    with torch.inference_mode():  # logits processors may change the scores in place, as in generate
        prefilled = Batch.prefill(model, [common], family, pad_id)
        assert prefilled.logits is not None
        suffixes = [row[shared:] for row in rows]
        extended = prefilled.select([0] * len(rows)).extend(model, suffixes, pad_id)  # column j predicts suffix token j + 1
        first = prefilled.logits.repeat(len(rows), 1)  # predicts suffix token 0 (a copy per row: processors work in place)
        width = max(len(suffix) for suffix in suffixes)
        ids = torch.tensor([row + [pad_id] * (width - len(suffix)) for row, suffix in zip(rows, suffixes)], device=extended.device)
        scores = torch.zeros(len(rows), device=extended.device)
        for column in range(width + 1):  # suffix token `column`, or past a row's last one, its end
            step = first if column == 0 else extended[:, column - 1]
            for logits_processor in logits_processors:
                step = logits_processor(ids[:, : shared + column], step)
            log_probs = torch.log_softmax(step, dim=-1)
            for index, (suffix, start) in enumerate(zip(suffixes, starts)):
                if column == len(suffix):
                    scores[index] += log_probs[index, list(end_ids)].logsumexp(-1)
                elif start - shared <= column < len(suffix):
                    scores[index] += log_probs[index, suffix[column]]
    return torch.nan_to_num(scores, nan=-torch.inf).tolist()  # a processor may rule out every token
