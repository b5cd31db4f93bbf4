"""Weighing continuations of one prompt by the model's likelihood, as one prefill-only request.

The prompt's images go through the vision encoder once (the family's `encode`), and every
continuation is the prompt with it written after the start of its reply (`Chat.continued`, as if the
model had written it there). All of them go through the language model in ONE forward of ONE row:
the tokens they share, then each continuation's own tokens in turn, under "tree attention" (a 4D
mask: the shared part is causal, each continuation's tokens see it and their own earlier tokens only,
at the positions they would have right after it). So a scoring pauses the running batch for one
newcomer's prefill, whatever the number of labels, and never copies the prompt's keys and values per
label (on a 9B model, about half a gigabyte per label for a 1,000-token prompt); it keeps no cache at all.
A continuation's score is the sum of the log probabilities of its tokens (from where its tokens stop
matching the prompt's own) and of its ending there: the probability of an end token right after it.
Without that end, a label whose tokens begin another's ("dog" and "dog house") would always win.
The logits processors that shape generation shape these scores too, position by position: each
factory of the backend's `row_processors` makes one for the prompt, applied to all its continuations.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from model.batch import Prompt, Row, prefill_forward
from model.family import ProcessedPrompt
from model.service import Chat


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


@dataclass(frozen=True)
class ProcessedScoring:
    """A scoring through the processor (CPU work: the prompt process's, or the worker's): the prompt,
    each continuation's token ids (the whole chat with it), and where each one's own tokens start."""

    prompt: ProcessedPrompt
    rows: list[list[int]]
    starts: list[int]


def process_scoring(family, chat: Chat, continuations: Sequence[str], cached: Container[str]) -> ProcessedScoring:
    """`chat` and each continuation of it tokenized, and the pixels of the images whose digests are not
    in `cached`. Only the reply changes, so every token after the prompt's common part sees the images
    the prompt's last token sees."""
    prompt = family.process(chat, cached)
    rows, starts = [], []
    for ids in family.continuation_ids(chat, continuations):
        start = _common_prefix(prompt.ids, ids)
        if start == len(ids):
            raise ValueError("every continuation must add at least one token")
        rows.append(ids)
        starts.append(start)
    return ProcessedScoring(prompt, rows, starts)


def _tree_attention(prefix: int, lengths: Sequence[int], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask (1, 1, tokens, tokens), additive in `dtype`, and the position ids (1, tokens)
    of one row holding a prefix and then suffixes of `lengths`: the prefix is causal, each suffix token
    sees the whole prefix and its own suffix's earlier tokens, at the positions it would have right
    after the prefix alone. Additive (0, or the dtype's least value), as the eager attention adds it to
    its scores and sdpa takes it; `create_causal_mask` passes a 4D mask through as it is (flash
    attention, which the loader never picks, would ignore it)."""
    branch = torch.arange(len(lengths) + 1, device=device).repeat_interleave(torch.tensor([prefix, *lengths], device=device))  # 0: prefix
    index = torch.arange(branch.shape[0], device=device)
    sees = (index[None, :] <= index[:, None]) & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None]))
    mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, torch.finfo(dtype).min)
    positions = torch.tensor([*range(prefix), *(prefix + step for length in lengths for step in range(length))], device=device)
    return mask[None, None], positions[None]


def score_continuations(
    model, family, chat: Chat, continuations: Sequence[str], *, end_ids: Collection[int], row_processors: Sequence[Callable] = ()
) -> list[float]:
    """The log-likelihood of each continuation, then an end token, as the reply to `chat`; `family`
    (model/family.py) makes the model's input. Processed here and now: see `score_processed`."""
    processed = process_scoring(family, chat, continuations, family.image_cache)
    return score_processed(model, family, processed, end_ids=end_ids, row_processors=row_processors)


def score_processed(model, family, processed: ProcessedScoring, *, end_ids: Collection[int], row_processors: Sequence[Callable] = ()) -> list[float]:
    """The log-likelihood of each processed continuation, then an end token. One forward of one row:
    the part all continuations share, then each one's own tokens, which see only that part and
    themselves. Raises `ImageEvicted` if an image processed as cached has left the image cache."""
    prompt, rows, starts = family.encode(model, processed.prompt), processed.rows, processed.starts
    logits_processors = [make(list(prompt.ids)) for make in row_processors]
    shared = min(starts)
    suffixes = [row[shared:] for row in rows]
    lengths = [len(suffix) for suffix in suffixes]
    # Its suffix tokens see the images the prefix's last token sees (`Row.image_mask`), as a reply's tokens do.
    packed = Row(
        owner="scoring",
        prompt=Prompt(prompt.ids[:shared], prompt.image_mask[:shared], prompt.images),
        max_new_tokens=0,
        said=[token for suffix in suffixes for token in suffix],
    )
    pad_id = family.tokenizer.pad_token_id
    with torch.inference_mode():  # logits processors may change the scores in place, as in generate
        layout = _tree_attention(shared, lengths, model.dtype, model.device)
        # The logits of the prefix's last position (each suffix's first token) and of every suffix token.
        forward = prefill_forward(model, [packed], family, pad_id, keep=1 + sum(lengths), packed=layout)
        logits = forward.output.logits[0].float()
        device = logits.device
        width = max(lengths)
        offsets = [0, *accumulate(lengths)]
        columns = range(width + 1)
        # Per column (a suffix's token, then past its last one its end) and row: where the logits that
        # predict it sit, the token, and whether it counts (from where the row's tokens stop matching
        # the prompt's) or is the row's end.
        at = torch.tensor(
            [[0 if column == 0 else offset + min(column, length) for offset, length in zip(offsets, lengths)] for column in columns], device=device
        )
        targets = torch.tensor([[suffix[column] if column < len(suffix) else 0 for suffix in suffixes] for column in columns], device=device)
        counted = torch.tensor([[start - shared <= column < len(suffix) for suffix, start in zip(suffixes, starts)] for column in columns], device=device)
        ends = torch.tensor([[column == len(suffix) for suffix in suffixes] for column in columns], device=device)
        steps = logits[at]  # (columns, rows, vocabulary): a copy, as processors work in place
        if logits_processors:
            ids = torch.tensor([row + [pad_id] * (width - length) for row, length in zip(rows, lengths)], device=device)
            for column in columns:
                for logits_processor in logits_processors:
                    steps[column] = logits_processor(ids[:, : shared + column], steps[column])
        log_probs = torch.log_softmax(steps, dim=-1)
        said = log_probs.gather(-1, targets[..., None])[..., 0]
        ended = log_probs[..., sorted(end_ids)].logsumexp(-1)
        scores = torch.where(counted, said, 0).sum(0) + torch.where(ends, ended, 0).sum(0)
    return torch.nan_to_num(scores, nan=-torch.inf).tolist()  # a processor may rule out every token
