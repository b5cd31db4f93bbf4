"""Weighing continuations of one prompt by the model's likelihood, in one batched forward pass.

Each continuation is written after the start of the prompt's reply (`Chat.continued`, as if the
model had written it there) and all of them go through the model together, as the model's family
makes their input. A continuation's score is the sum of the log
probabilities of its tokens: the tokens from where its input stops matching the prompt's own.
The logits processors that shape generation shape these scores too, position by position: each
factory of the backend's `row_processors` makes one for the prompt, applied to all its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from model.service import Chat


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def score_continuations(model, family, prompt: Chat, continuations: Sequence[str], row_processors: Sequence[Callable] = ()) -> list[float]:
    """The log-likelihood of each continuation after `prompt`; `family` (model/family.py) makes the model's input."""
    prompt_ids = family.model_inputs([prompt])["input_ids"][0].tolist()
    logits_processors = [make(list(prompt_ids)) for make in row_processors]
    inputs = family.model_inputs([prompt.continued(text) for text in continuations]).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # Left padding: every row ends with its continuation, so the last positions cover them all.
    starts = [_common_prefix(prompt_ids, row[row_mask.bool()].tolist()) for row, row_mask in zip(ids, mask)]
    lengths = [int(row_mask.sum()) - start for row_mask, start in zip(mask, starts)]
    if min(lengths) < 1:
        raise ValueError("every continuation must add at least one token")
    keep = max(lengths)
    width = ids.shape[1]
    scores = torch.zeros(ids.shape[0], device=ids.device)
    with torch.inference_mode():  # logits processors may change the scores in place, as in generate
        logits = model(**inputs, logits_to_keep=keep + 1).logits.float()  # position p predicts token p + 1
        for offset in range(keep):
            position = width - keep + offset  # the token scored at this step, in every row
            step = logits[:, offset]
            for logits_processor in logits_processors:
                step = logits_processor(ids[:, :position], step)
            log_probs = torch.log_softmax(step, dim=-1).gather(1, ids[:, position : position + 1]).squeeze(1)
            counts = torch.tensor([offset >= keep - length for length in lengths], device=ids.device)
            scores += torch.where(counts, log_probs, torch.zeros_like(log_probs))
    return torch.nan_to_num(scores, nan=-torch.inf).tolist()  # a processor may rule out every token
