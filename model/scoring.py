"""Weighing continuations of one prompt by the model's likelihood, as one prefill-only request.

The prompt's images go through the vision encoder and perceiver once (`encode_prompt`), then every
continuation becomes a row (the prompt with the continuation appended to its last text item, as if
the model had written it there) and all rows go through the model in one forward, like newcomers'
prefill in the running batch. A continuation's score is the sum of the log probabilities of its
tokens (from where its tokens stop matching the prompt's own) and of its ending there: the
probability of an end token right after it. Without that end, a label whose tokens begin another's
("dog" and "dog house") would always win.
The logits processors that shape generation shape these scores too, position by position: each
factory of the backend's `row_processors` makes one for the prompt, applied to all its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from model.batch import Prompt, Row, encode_prompt, image_state_shape, prefill_forward, process_prompt
from model.markers import marked_text
from model.service import continued


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def continuation_rows(model, processor, items: list, continuations: Sequence[str]) -> tuple[Prompt, list[Row], list[int]]:
    """The prompt (its images encoded), one row per continuation sharing those images, and where each
    row's own tokens start. Only the prompt's last text item changes, so every token after the prompt's common part
    sees the images the prompt's last token sees."""
    prompt = encode_prompt(model, process_prompt(processor, items))
    tokenizer = processor.tokenizer
    rows, starts = [], []
    for text in continuations:
        ids = tokenizer(tokenizer.bos_token + marked_text(continued(items, text)), add_special_tokens=False).input_ids
        start = _common_prefix(prompt.ids, ids)
        if start == len(ids):
            raise ValueError("every continuation must add at least one token")
        mask = torch.cat([prompt.image_mask[:start], prompt.image_mask[-1:].expand(len(ids) - start, -1)])
        rows.append(Row(owner=text, prompt=Prompt(ids, mask, prompt.images), max_new_tokens=0))
        starts.append(start)
    return prompt, rows, starts


def score_continuations(
    model, processor, items: list, continuations: Sequence[str], *, end_ids: Collection[int], row_processors: Sequence[Callable] = ()
) -> list[float]:
    """The log-likelihood of each continuation, then an end token, after `items` (processor items:
    text and PIL images, the last one text)."""
    prompt, rows, starts = continuation_rows(model, processor, items, continuations)
    logits_processors = [make(list(prompt.ids)) for make in row_processors]
    lengths = [len(row.ids) - start for row, start in zip(rows, starts)]
    keep = max(lengths)
    forward = prefill_forward(model, rows, image_state_shape(model.config), processor.tokenizer.pad_token_id, keep=keep + 1)
    ids = forward.ids
    width = ids.shape[1]
    logits = forward.output.logits.float()  # position p predicts token p + 1; the last one, what follows
    ends = list(end_ids)
    scores = torch.zeros(ids.shape[0], device=ids.device)
    with torch.inference_mode():  # logits processors may change the scores in place, as in generate
        for offset in range(keep + 1):
            position = width - keep + offset  # the token scored at this step, in every row (width: the end)
            step = logits[:, offset]
            for logits_processor in logits_processors:
                step = logits_processor(ids[:, :position], step)
            log_probs = torch.log_softmax(step, dim=-1)
            if position == width:
                scores += log_probs[:, ends].logsumexp(-1)
                continue
            picked = log_probs.gather(1, ids[:, position : position + 1]).squeeze(1)
            counts = torch.tensor([offset >= keep - length for length in lengths], device=ids.device)
            scores += torch.where(counts, picked, torch.zeros_like(picked))
    return torch.nan_to_num(scores, nan=-torch.inf).tolist()  # a processor may rule out every token
